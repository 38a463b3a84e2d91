"""Generation (presets, cleaning, batching, resume batches), KL/CE, and generation metrics."""

import math

import numpy as np
import pytest
import torch

from baselines.shift import AdditiveShift
from bench.generation import GEN_PRESETS, answer_context, clean_answer, gen_prompt, generate
from bench.interventions import Intervention
from bench.metrics.fluency import continuation_nll
from bench.metrics.generation import combine_product, generation_metrics
from bench.tasks.kl_ce import kl_ce, make_windows


@pytest.mark.parametrize(("raw", "want"), [
    ("\nA: Paris is the capital.\n\nQ: next", "Paris is the capital."),
    (" Paris.", "Paris."),
    ("\nA: \n\nQ:", ""),
    ("", ""),
    ("A: one A: two", "one A: two"),
])
def test_clean_answer_cuts_at_q_and_keeps_text_after_a(raw, want):
    assert clean_answer(raw) == want


@pytest.mark.parametrize(("raw", "context", "answer"), [
    ("\nA: Paris is the capital.\n\nQ: next", "P\nA:", " Paris is the capital."),
    (" Paris. ", "P", " Paris."),
    ("\nA: \n\nQ:", "P\nA:", ""),
    ("A: one A: two", "PA:", " one A: two"),
])
def test_answer_context_scores_the_answer_that_clean_answer_keeps(raw, context, answer):
    assert answer_context("P", raw) == (context, answer)
    assert answer.strip() == clean_answer(raw)


def test_continuation_nll_is_the_mean_token_nll_of_the_continuation(tiny_llama):
    tok = tiny_llama.tokenizer
    prompt, cont = "The cat sat on the", " mat and slept"
    ids = torch.tensor([tok(prompt + cont)["input_ids"]])
    n_prompt = len(tok(prompt)["input_ids"])
    logp = torch.log_softmax(tiny_llama.model(ids).logits[0, :-1].float(), -1)
    direct = -logp[torch.arange(n_prompt - 1, ids.shape[1] - 1), ids[0, n_prompt:]].mean().item()
    got = continuation_nll(tiny_llama, [prompt, prompt, prompt], [cont, "", " mat"])
    assert got[0] == pytest.approx(direct, rel=1e-4) and got[1] is None and got[2] is not None
    with pytest.raises(ValueError, match="2 prompts but 1 continuations"):
        continuation_nll(tiny_llama, ["a", "b"], ["c"])


def test_presets_end_with_the_question_and_unknown_preset_is_rejected():
    for name in GEN_PRESETS:
        p = gen_prompt("Why?", name)
        assert "Q: Why?" in p and "Q: What is human life expectancy" in p
    assert gen_prompt("Why?", "iti").endswith("\n\nQ: Why?")
    assert gen_prompt("Why?", "lm-eval").endswith("\n\nQ: Why?\nA:")
    assert "I have no comment" not in GEN_PRESETS["iti-informative"].template.split("\n\n")[0]
    with pytest.raises(ValueError, match="valid: iti"):
        gen_prompt("Why?", "nope")


def _shift(lm, scale: float) -> Intervention:
    heads, dim = lm.spec.site_shape("heads")
    torch.manual_seed(1)
    return Intervention("mean-shift", "heads", {1: AdditiveShift(scale * torch.randn(heads, dim))},
                        {"heads": heads, "head_dim": dim})


def test_batched_generation_equals_one_at_a_time_and_interventions_change_it(tiny_llama):
    prompts = [gen_prompt(f"What is fact {i}?" + " really" * i, "qa") for i in range(5)]
    batched = generate(tiny_llama, prompts, max_new_tokens=8, batch_size=3)
    single = [generate(tiny_llama, [p], max_new_tokens=8, batch_size=1)[0] for p in prompts]
    assert batched == single
    assert all(isinstance(t, str) for t in batched)
    steered = generate(tiny_llama, prompts, _shift(tiny_llama, 50.0), max_new_tokens=8, batch_size=3)
    assert steered != batched


def test_skipped_batches_are_not_decoded_and_callbacks_see_every_batch(tiny_llama):
    prompts = [gen_prompt(f"Q{i}" * (i + 1), "qa") for i in range(6)]
    seen = []
    full = generate(tiny_llama, prompts, max_new_tokens=4, batch_size=2, on_batch=lambda idx, t: seen.append(idx))
    assert sorted(i for b in seen for i in b) == list(range(6))
    first = set(seen[0])
    resumed = generate(tiny_llama, prompts, max_new_tokens=4, batch_size=2, skip=first)
    assert all(resumed[i] == "" for i in first)
    assert all(resumed[i] == full[i] for i in range(6) if i not in first)


def test_kl_is_zero_without_and_positive_with_an_intervention_and_ce_is_the_lm_loss(tiny_llama):
    texts = ["Telescopes use lenses or mirrors to focus light."] * 40
    win = make_windows(tiny_llama, texts, n_windows=3, length=16)
    assert win.shape == (3, 16) and (win[:, 0] == tiny_llama.tokenizer.bos_token_id).all()
    base = kl_ce(tiny_llama, win)
    assert base["kl"] == [0.0, 0.0, 0.0]
    with torch.no_grad():
        direct = [tiny_llama.model(input_ids=w[None], labels=w[None]).loss.item() for w in win]
    np.testing.assert_allclose(base["ce"], direct, rtol=1e-5)
    steered = kl_ce(tiny_llama, win, _shift(tiny_llama, 5.0))
    assert min(steered["kl"]) > 0 and steered["ce"] != base["ce"]


def test_kl_computed_in_chunks_of_positions_equals_the_whole_window_at_once(tiny_llama, monkeypatch):
    import bench.tasks.kl_ce as klce

    texts = ["Telescopes use lenses or mirrors to focus light, and some use both."] * 40
    win = make_windows(tiny_llama, texts, n_windows=3, length=16)
    iv = _shift(tiny_llama, 5.0)
    with torch.no_grad():
        base = torch.log_softmax(tiny_llama.model(input_ids=win).logits[:, :-1].float(), -1)
        with iv.applied(tiny_llama, "all"):
            logp = torch.log_softmax(tiny_llama.model(input_ids=win).logits[:, :-1].float(), -1)
    kl = (base.exp() * (base - logp)).sum(-1).clamp_min(0).mean(1)
    ce = -logp.gather(-1, win[:, 1:, None])[..., 0].mean(1)
    vocab = base.shape[-1]
    monkeypatch.setattr(klce, "CHUNK_ELEMENTS", 4 * vocab + 1)  # 4 positions per chunk: 15 = 4 + 4 + 4 + 3
    got = kl_ce(tiny_llama, win, iv, batch_size=2)
    np.testing.assert_allclose(got["kl"], kl.tolist(), rtol=1e-6)
    np.testing.assert_allclose(got["ce"], ce.tolist(), rtol=1e-6)
    tiny_llama.earlier_paths = True  # the earlier code path: the whole batch at once (bench.earlier)
    try:
        earlier = kl_ce(tiny_llama, win, iv, batch_size=2)
    finally:
        tiny_llama.earlier_paths = False
    np.testing.assert_allclose(earlier["kl"], got["kl"], rtol=1e-6)
    np.testing.assert_allclose(earlier["ce"], got["ce"], rtol=1e-6)


@pytest.mark.parametrize(("family", "site"), [("llama", "heads"), ("gemma", "residual"), ("gemma", "heads")])
def test_kl_ce_resumes_the_intervened_pass_at_the_first_edited_layer_with_the_same_values(family, site, monkeypatch):
    """The intervened pass skips the layers below the first edited one (their input recorded in the unintervened
    pass): layer 0 runs once per batch, the values equal two whole passes bit for bit (Gemma-3's sliding window
    included: 24-token windows, a 16-token sliding window), and the model's layers are whole afterwards."""
    from contextlib import nullcontext

    import bench.tasks.kl_ce as klce
    from tiny_models import tiny_model

    lm = tiny_model(family, seed=2, n_layers=4)
    heads, dim = lm.spec.site_shape(site)
    torch.manual_seed(3)
    iv = Intervention("mean-shift", site, {k: AdditiveShift(2.0 * torch.randn(heads, dim)) for k in (2, 3)},
                      {"heads": heads, "head_dim": dim})
    win = make_windows(lm, ["Telescopes use lenses or mirrors to focus light, and some use both."] * 40,
                       n_windows=4, length=24)
    layers = lm.model.get_submodule(lm.spec.layers_path)
    first, calls = layers[0], []
    first.register_forward_hook(lambda *_: calls.append(1))
    got = kl_ce(lm, win, iv, batch_size=2)
    assert len(calls) == 2 and layers[0] is first  # two batches, one pass each through layer 0; restored
    monkeypatch.setattr(klce, "resumed", lambda *a: nullcontext())  # both passes whole
    monkeypatch.setattr(klce, "layer_input", lambda *a: nullcontext())
    whole = kl_ce(lm, win, iv, batch_size=2)
    assert len(calls) == 6 and min(got["kl"]) > 0
    assert got == whole


def test_make_windows_needs_enough_text(tiny_llama):
    with pytest.raises(ValueError, match="windows of 128 need"):
        make_windows(tiny_llama, ["short"], n_windows=100, length=128)


def test_generation_metrics_report_both_true_info_definitions():
    true = [True, True, False, False, True]
    info = [True, False, True, False, True]
    m = generation_metrics(true, info)
    assert m["true"]["mean"] == pytest.approx(0.6) and m["info"]["mean"] == pytest.approx(0.6)
    assert m["true_and_info"]["mean"] == pytest.approx(0.4)
    assert m["true_info_product"]["mean"] == pytest.approx(0.36)
    t, i = np.array(true, float), np.array(info, float)
    cov = np.cov(t, i)[0, 1] / 5
    se_t, se_i = t.std(ddof=1) / math.sqrt(5), i.std(ddof=1) / math.sqrt(5)
    want = math.sqrt(0.6**2 * se_t**2 + 0.6**2 * se_i**2 + 2 * 0.36 * cov)
    assert m["true_info_product"]["se"] == pytest.approx(want)
    combined = combine_product({"mean": 0.5, "se": 0.1, "n": 10}, {"mean": 0.8, "se": 0.05, "n": 10},
                               [{"cov_true_info": 0.0}, {"cov_true_info": 0.0}])
    assert combined["mean"] == pytest.approx(0.4)
    assert combined["se"] == pytest.approx(math.sqrt(0.64 * 0.01 + 0.25 * 0.0025))
    with pytest.raises(ValueError, match="same, non-zero"):
        generation_metrics([True], [])


def test_progress_file_drops_a_torn_tail_so_later_appends_stay_readable(tmp_path):
    from bench.runs import append_progress, read_progress

    path = tmp_path / "progress.jsonl"
    append_progress(path, [{"index": 0}, {"index": 1}])
    with path.open("a") as fh:
        fh.write('{"index": 2, "ans')  # killed mid-write
    assert read_progress(path) == [{"index": 0}, {"index": 1}]
    append_progress(path, [{"index": 2}, {"index": 3}])
    assert [r["index"] for r in read_progress(path)] == [0, 1, 2, 3]
    assert read_progress(tmp_path / "missing.jsonl") == []


EARLY_EOS = [2, *range(100, 140)]  # extra end-of-sequence ids, so the tiny models' rows end at different steps


def _low_rank(lm):
    from florain import LowRankHeadMap

    heads, dim = lm.spec.site_shape("heads")
    gen = torch.Generator().manual_seed(3)
    m = LowRankHeadMap(heads, dim, 4, gen)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=gen))  # a map far from the identity
    return Intervention("florain", "heads", {1: m}, {"heads": heads, "head_dim": dim})


@pytest.mark.parametrize("family", ["llama", "gemma"])
@pytest.mark.parametrize("edit", ["none", "shift", "shift-all-positions", "florain"])
def test_prefix_cached_generation_equals_the_plain_path(family, edit, request, monkeypatch):
    """The shared prefix run once + continuous batching (default) = HF generate on left-padded batches, token for
    token, with interventions at the last prompt token and every generated one, stop strings and early EOS."""
    lm = request.getfixturevalue(f"tiny_{family}")
    monkeypatch.setattr(lm.model.generation_config, "eos_token_id", EARLY_EOS)
    iv = {"none": None, "shift": _shift(lm, 5.0), "florain": _low_rank(lm),
          "shift-all-positions": _shift(lm, 5.0)}[edit]
    if edit == "shift-all-positions":
        iv.position_policy = "all"
    prompts = [gen_prompt(f"What is fact {i}?" + " really" * (i % 4), "qa") for i in range(11)]
    kw = dict(max_new_tokens=12, stop=("e",))
    plain = generate(lm, prompts, iv, batch_size=4, prefix_cache=False, **kw)
    for batch_size in (3, 32):
        assert generate(lm, prompts, iv, batch_size=batch_size, **kw) == plain
    if iv is None:
        assert len({len(lm.tokenizer(t)["input_ids"]) for t in plain}) >= 2  # rows did end at different steps
    else:
        assert plain != generate(lm, prompts, None, batch_size=4, prefix_cache=False, **kw)


def test_decode_keeps_each_rows_answer_whatever_rows_it_runs_beside(tiny_llama, monkeypatch):
    from bench.decoding import decode, shared_prefix

    monkeypatch.setattr(tiny_llama.model.generation_config, "eos_token_id", EARLY_EOS)
    ids = tiny_llama.tokenizer([gen_prompt(f"Fact {i}?" * (i + 1), "qa") for i in range(6)])["input_ids"]
    prefix = shared_prefix(tiny_llama, ids)
    assert prefix.length > 10 and prefix.length < min(len(x) for x in ids)
    seen: list[int] = []
    together = decode(tiny_llama, ids, prefix, 10, eos=set(EARLY_EOS), batch_size=4, on_row=lambda r, t: seen.append(r))
    assert sorted(seen) == list(range(6))
    for r in range(6):
        assert decode(tiny_llama, [ids[r]], prefix, 10, eos=set(EARLY_EOS))[0] == together[r]
    with pytest.raises(ValueError, match="at least one prompt token"):
        decode(tiny_llama, [ids[0][: prefix.length]], prefix, 4)


def test_contiguous_head_input_changes_no_logit(tiny_llama):
    ids = torch.tensor([tiny_llama.tokenizer("The cat sat on the mat")["input_ids"]] * 3)
    with torch.no_grad():
        hooked = tiny_llama.model(ids, logits_to_keep=1).logits
        tiny_llama.head_hook.remove()
        try:
            plain = tiny_llama.model(ids, logits_to_keep=1).logits
        finally:
            from bench.models import contiguous_head_input

            tiny_llama.head_hook = tiny_llama.model.get_output_embeddings().register_forward_pre_hook(
                contiguous_head_input)
    torch.testing.assert_close(hooked, plain, rtol=1e-5, atol=1e-5)
