"""ITI's σ bank (``iti_sigma_bank``) and the MC edit offset (``mc_edit_offset``, every task-policy method)."""

from __future__ import annotations

import json

import pytest
import torch

import bench.methods.iti as methods
from baselines.iti import iti_shift
from baselines.shift import AdditiveShift
from bench.capture import capture
from bench.data.truthfulqa import load_truthfulqa, make_folds
from bench.interventions import Intervention, get_method
from bench.methods import FitContext
from bench.methods.iti import gen_end_q_texts
from bench.scoring import Encoded, answer_logprobs, encode


def _ctx(lm, tqa_dir, options=None, fold=0):
    qs, _ = load_truthfulqa(tqa_dir, use_hub=False)
    f = make_folds(len(qs), 2, 0.2, 42)[fold]
    return FitContext(lm, qs, f, 1, "heads", {"k": 3, **(options or {})}), qs, f


# --------------------------------------------------------------------------- σ bank


def test_iti_shift_takes_sigma_from_another_bank():
    g = torch.Generator().manual_seed(0)
    acts, bank = torch.randn(40, 3, 4, generator=g), 5 * torch.randn(30, 3, 4, generator=g)
    labels = torch.tensor([1, 0] * 20)
    own, other = iti_shift(acts, labels, [0, 2], 15.0), iti_shift(acts, labels, [0, 2], 15.0, sigma_acts=bank)
    unit = own / own.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    torch.testing.assert_close(other[[0, 2]] / other[[0, 2]].norm(dim=-1, keepdim=True), unit[[0, 2]])  # same θ̂
    sigma = torch.einsum("nhd,hd->nh", bank, unit).std(0)
    torch.testing.assert_close(other[[0, 2]].norm(dim=-1), 15.0 * sigma[[0, 2]])
    with pytest.raises(ValueError, match="σ bank"):
        iti_shift(acts, labels, [0], 15.0, sigma_acts=bank[:, :2])


def test_gen_end_q_texts_follow_iti_and_stay_within_the_given_questions(tqa_dir):
    qs, _ = load_truthfulqa(tqa_dir, use_hub=False)
    rows = [0, 2, 3, 7]
    texts = gen_end_q_texts(qs, rows, seed=42)
    assert texts == gen_end_q_texts(qs, rows, seed=42)  # seeded: the same texts hit the activation cache
    assert len(texts) == sum(len(qs[i].correct) + len(qs[i].incorrect) for i in rows)
    allowed = {qs[i].question for i in rows}
    for i in rows:
        q = qs[i]
        mine = [t for t in texts if t.startswith(f"Q: {q.question} A: ")]
        assert [t[len(f"Q: {q.question} A: "):].split(" Q: ")[0] for t in mine] == [*q.correct, *q.incorrect]
        trailing = {t.rsplit(" Q: ", 1)[1] for t in mine}
        assert len(trailing) == 1 and trailing <= allowed  # one drawn question per question, as in ITI


def test_iti_sigma_bank_default_is_gen_end_q_from_the_training_fold_only(tiny_llama, tqa_dir, monkeypatch):
    assert get_method("iti").effective_options({})["sigma_bank"] is None  # the texts decide: TruthfulQA answers → gen_end_q
    ctx, qs, fold = _ctx(tiny_llama, tqa_dir)
    seen: list[list[str]] = []

    def recording(lm, texts, layers, site="heads", batch_size=32, use_cache=True):
        seen.append(list(texts))
        return capture(lm, texts, layers, site, batch_size, use_cache)

    monkeypatch.setattr(methods, "capture", recording)
    iv = get_method("iti").fit(ctx)
    assert iv.config["sigma_bank"] == "gen_end_q"
    bank = [t for texts in seen for t in texts if t.count(" Q: ") == 1]
    assert bank and iv.config["n_sigma_texts"] == len(bank)
    fold_qs = {qs[i].question for i in (*fold.train, *fold.val)}
    test_qs = {qs[i].question for i in fold.test}
    assert all(q not in t for t in bank for q in test_qs)  # never a test question, neither first nor trailing
    assert {t.split(" A: ")[0][3:] for t in bank} == fold_qs
    # σ is the std of that bank's projections on the direction θ̂ (θ from the qa activations)
    layer = iv.layers[0]
    sigma_acts = capture(tiny_llama, bank, [layer])[layer]
    shift = iv.modules[layer].shift
    for lay, h in iv.config["heads_chosen"]:
        if lay == layer:
            unit = shift[h] / shift[h].norm()
            expected = 15.0 * (sigma_acts[:, h] @ unit).std()
            torch.testing.assert_close(shift[h].norm(), expected, rtol=1e-4, atol=1e-6)


def test_iti_sigma_bank_qa_keeps_the_direction_and_changes_only_the_scale(tiny_llama, tqa_dir):
    default = get_method("iti").fit(_ctx(tiny_llama, tqa_dir)[0])
    qa = get_method("iti").fit(_ctx(tiny_llama, tqa_dir, {"sigma_bank": "qa"})[0])
    assert qa.config["sigma_bank"] == "qa" and qa.config["heads_chosen"] == default.config["heads_chosen"]
    for lay, h in qa.config["heads_chosen"]:
        a, b = qa.modules[lay].shift[h], default.modules[lay].shift[h]
        torch.testing.assert_close(a / a.norm(), b / b.norm())
        assert not torch.isclose(a.norm(), b.norm(), rtol=1e-3)
    with pytest.raises(ValueError, match="option sigma_bank: cannot read 'all'; valid: qa | gen_end_q"):
        get_method("iti").fit(_ctx(tiny_llama, tqa_dir, {"sigma_bank": "all"})[0])
    ctx = _ctx(tiny_llama, tqa_dir, {"sigma_bank": "gen_end_q"})[0]
    ctx.text_format = "continuation"  # toxicity's fitting texts have no such bank
    with pytest.raises(ValueError, match="σ bank"):
        get_method("iti").fit(ctx)


# --------------------------------------------------------------------------- MC edit offset


def _per_token(lm, enc: Encoded, iv, offset: int, prefix_cache: bool) -> list[float]:
    """Each answer token's log-prob, from the sums over growing answer prefixes (the model is causal)."""
    prefixes = [Encoded(enc.ids[: a + 1], enc.answer[: j + 1]) for j, a in enumerate(enc.answer)]
    sums = answer_logprobs(lm, prefixes, iv, batch_size=4, prefix_cache=prefix_cache, edit_offset=offset)
    return [s - (sums[j - 1] if j else 0.0) for j, s in enumerate(sums)]


@pytest.mark.parametrize("prefix_cache", [True, False])
@pytest.mark.parametrize("offset", [0, 1, 2])
def test_mc_edit_offset_leaves_the_first_offset_plus_one_answer_tokens_unintervened(tiny_llama, offset,
                                                                                       prefix_cache):
    lm = tiny_llama
    heads, dim = lm.spec.site_shape("heads")
    shift = 3.0 * torch.randn(heads, dim, generator=torch.Generator().manual_seed(1))
    iv = Intervention("iti", "heads", {1: AdditiveShift(shift)}, {"heads": heads, "head_dim": dim})
    context = "Interpret each question literally.\n\nQ: Where were the Olympics held?\nA: "
    enc = encode(lm, context + "They were held in Barcelona, Spain, in 1992.", len(context))
    assert len(enc.answer) >= offset + 3
    base = _per_token(lm, enc, None, offset, prefix_cache)
    edited = _per_token(lm, enc, iv, offset, prefix_cache)
    for j, (a, b) in enumerate(zip(base, edited)):
        if j <= offset:
            assert abs(a - b) <= 1e-5, (j, a, b)  # predicted at positions the edit does not reach
        else:
            assert abs(a - b) > 1e-4, (j, a, b)
    # the whole answer at once equals the sum of its tokens
    (total,) = answer_logprobs(lm, [enc], iv, prefix_cache=prefix_cache, edit_offset=offset)
    assert abs(total - sum(edited)) <= 1e-4


def test_mc_edit_offset_does_not_restrict_an_every_token_edit(tiny_llama):
    lm = tiny_llama
    heads, dim = lm.spec.site_shape("heads")
    iv = Intervention("lofit", "heads", {1: AdditiveShift(torch.ones(heads, dim))}, {"heads": heads, "head_dim": dim})
    iv.position_policy = "all"
    context = "Q: Who wrote Hamlet?\nA: "
    enc = encode(lm, context + "Shakespeare wrote it.", len(context))
    assert answer_logprobs(lm, [enc], iv, edit_offset=0) == pytest.approx(answer_logprobs(lm, [enc], iv, edit_offset=3))


def test_mc_edit_offset_is_a_run_option_recorded_in_results(tiny_dir, tqa_dir, tmp_path):
    from bench.runner import RunConfig, run

    quiet = {"echo": lambda m: None}
    common = dict(method="iti", model=str(tiny_dir), task="truthfulqa-mc", folds=2, limit=12, eval_folds=[0],
                  options={"k": 3, "alpha": 30.0})
    zero = run(RunConfig(**common), tmp_path / "zero", str(tqa_dir), **quiet)
    one = run(RunConfig(**common, mc_edit_offset=1), tmp_path / "one", str(tqa_dir), **quiet)
    assert zero["config"]["mc_edit_offset"] == 0 and one["config"]["mc_edit_offset"] == 1
    assert json.loads((tmp_path / "one" / "results.json").read_text())["config"]["mc_edit_offset"] == 1
    assert zero["metrics"]["mc2"]["mean"] != one["metrics"]["mc2"]["mean"]
    with pytest.raises(ValueError, match="mc-edit-offset"):
        run(RunConfig(**common, mc_edit_offset=-1), tmp_path / "neg", str(tqa_dir), **quiet)
