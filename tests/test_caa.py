"""CAA is built from A/B pairs of the fold's training questions; its layer is chosen on the validation questions."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from baselines.caa import ab_pairs, ab_prompt, balanced_flips, mean_pair_difference, pair_answers
from baselines.shift import mean_difference
from bench.capture import capture
from bench.data.truthfulqa import load_truthfulqa, make_folds
from bench.interventions import get_method
from bench.methods import FitContext
from bench.methods.caa import _ab_encode, _caa_items


def _ctx(lm, tqa_dir, options=None, fold=0, layer=-1):
    qs, _ = load_truthfulqa(tqa_dir, use_hub=False)
    f = make_folds(len(qs), 2, 0.2, 42)[fold]
    return FitContext(lm, qs, f, layer, "heads", dict(options or {})), qs, f


def _train_items(qs, fold):
    """The training pairs by the documented rule: correct answer j with incorrect answer j mod n_incorrect."""
    return [(qs[i].index, qs[i].question, c, qs[i].incorrect[j % len(qs[i].incorrect)])
            for i in fold.train for j, c in enumerate(qs[i].correct)]


def test_ab_prompts_balance_the_letters_and_share_the_question(tiny_llama):
    items = [(k, f"What is fact {k}?", f"Fact {k} is true.", f"Fact {k} is false.") for k in range(9)]
    pairs = ab_pairs(items, seed=3)
    assert sum(p.desirable == "A" for p in pairs) == 5 and sum(p.desirable == "B" for p in pairs) == 4
    assert [p.desirable for p in pairs] != [p.desirable for p in ab_pairs(items, seed=4)]  # the seed orders them
    assert sum(balanced_flips(10, 0)) == 5
    for (k, question, good, bad), p in zip(items, pairs):
        assert p.group == k
        assert p.positive[:-1] == p.negative[:-1] == p.prompt and p.prompt.endswith("Response: (")
        assert question in p.prompt and {p.positive[-1], p.negative[-1]} == {"A", "B"}
        assert f"({p.desirable}) {good}" in p.prompt and f"({p.undesirable}) {bad}" in p.prompt
        assert p.prompt == ab_prompt(question, *((good, bad) if p.desirable == "A" else (bad, good)))
    for (prompt, good_id, bad_id), p in zip(_ab_encode(tiny_llama, pairs), pairs):
        tok = tiny_llama.tokenizer
        assert tok.decode([good_id]) == p.desirable and tok.decode([bad_id]) == p.undesirable
        assert tok(p.positive)["input_ids"] == prompt + [good_id]  # the letter is the last token
    assert pair_answers(("c1", "c2", "c3"), ("w1", "w2")) == [("c1", "w1"), ("c2", "w2"), ("c3", "w1")]


def test_vector_is_the_mean_of_per_pair_letter_differences(tiny_llama, tqa_dir):
    ctx, qs, fold = _ctx(tiny_llama, tqa_dir, {"layer": 1, "multiplier": 2.0})
    iv = get_method("caa").fit(ctx)
    assert iv.method == "caa" and iv.site == "residual" and iv.layers == [1]
    assert iv.config["layer_choice"] == "fixed" and "val_scores" not in iv.config
    pairs = ab_pairs(_train_items(qs, fold), seed=42)
    assert iv.config["n_train_pairs"] == len(pairs) == sum(len(qs[i].correct) for i in fold.train)
    diffs = []
    with torch.no_grad():  # read independently: the hidden state after decoder layer 1 at the last (letter) token
        for p in pairs:
            hs = [tiny_llama.model(**tiny_llama.tokenizer(t, return_tensors="pt"), output_hidden_states=True)
                  .hidden_states[2][0, -1] for t in (p.positive, p.negative)]
            diffs.append(hs[0] - hs[1])
    by_hand = 2.0 * torch.stack(diffs).mean(0)
    torch.testing.assert_close(iv.modules[1].shift[0], by_hand, atol=1e-5, rtol=1e-4)
    acts = capture(tiny_llama, [p.positive for p in pairs] + [p.negative for p in pairs], [1], "residual")[1]
    n = len(pairs)
    torch.testing.assert_close(mean_pair_difference(acts[:n], acts[n:]),
                               sum(acts[i] - acts[n + i] for i in range(n)) / n, atol=1e-6, rtol=1e-5)


def test_auto_layer_is_the_validation_argmax_and_never_reads_test_questions(tiny_llama, tqa_dir):
    ctx, qs, fold = _ctx(tiny_llama, tqa_dir)
    iv = get_method("caa").fit(ctx)
    cfg = iv.config
    assert cfg["layers_swept"] == [0, 1, 2] and len(cfg["val_scores"]) == 3
    assert iv.layers == [cfg["layer"]] == [cfg["layers_swept"][int(np.argmax(cfg["val_scores"]))]]
    assert set(cfg["val_questions"]) == {qs[i].index for i in fold.val} and cfg["n_val_prompts"] == len(fold.val)
    assert any(s != cfg["val_score_unsteered"] for s in cfg["val_scores"])  # the sweep does steer
    poisoned = list(qs)
    for i in fold.test:
        poisoned[i] = replace(qs[i], question="POISON " * 5, best_answer="x.", correct=("x.",) * 7,
                              incorrect=("y.",))
    again = get_method("caa").fit(FitContext(tiny_llama, poisoned, fold, -1, "heads", {}))
    assert again.layers == iv.layers and again.config["val_scores"] == cfg["val_scores"]
    torch.testing.assert_close(again.modules[iv.layers[0]].shift, iv.modules[iv.layers[0]].shift)


def test_caa_skips_one_sided_questions_and_checks_its_options(tiny_llama, tqa_dir):
    ctx, qs, fold = _ctx(tiny_llama, tqa_dir)
    i = fold.train[0]
    ctx.questions = list(qs)
    ctx.questions[i] = replace(qs[i], incorrect=())
    assert all(item[0] != qs[i].index for item in _caa_items(ctx, "train", True, 42))
    with pytest.raises(ValueError, match="option layer: cannot read 'best'; valid: int | auto"):
        get_method("caa").fit(_ctx(tiny_llama, tqa_dir, {"layer": "best"})[0])
    with pytest.raises(ValueError, match="layer"):
        get_method("caa").fit(_ctx(tiny_llama, tqa_dir, {"layer": 7})[0])


def test_mean_diff_resid_is_the_pooled_variant_at_the_runs_layer(tiny_llama, tqa_dir):
    ctx, _, _ = _ctx(tiny_llama, tqa_dir, {"multiplier": 3.0}, layer=2)
    iv = get_method("mean-diff-resid").fit(ctx)
    assert iv.method == "mean-diff-resid" and iv.site == "residual" and iv.layers == [2]
    acts, labels, groups = ctx.activations([2], "residual")
    rows = ctx.split(groups, "train") | ctx.split(groups, "val")
    torch.testing.assert_close(iv.modules[2].shift, 3.0 * mean_difference(acts[2][rows], labels[rows]))
    assert get_method("mean-diff-resid").needs_layer and not get_method("caa").needs_layer


@pytest.mark.parametrize("family", ["tiny_llama", "tiny_gemma"])
def test_sweep_scores_equal_full_forwards_with_the_edit_at_the_last_token(family, request):
    """The sweep reruns only the last prompt token per layer on a cache of the rest; a full forward agrees."""
    from bench.methods.caa import _ab_scores
    from bench.sites import hooked

    lm = request.getfixturevalue(family)
    items = [(k, f"What is fact {k}?" + " Really?" * k, f"Fact {k} is true.", "No.") for k in range(5)]
    enc = _ab_encode(lm, ab_pairs(items, seed=1))
    dim = lm.spec.site_shape("residual")[1]
    vectors = {layer: torch.randn(1, dim, generator=torch.Generator().manual_seed(layer)) * 3 for layer in (0, 2)}
    base, scores = _ab_scores(lm, enc, vectors, batch_size=2)

    def naive(layer=None):
        total = 0.0
        for ids, good, bad in enc:
            x = torch.tensor([ids])
            with torch.no_grad():
                if layer is None:
                    logits = lm.model(input_ids=x).logits
                else:
                    from baselines.shift import AdditiveShift

                    with hooked(lm.model, lm.spec, layer, "residual", AdditiveShift(vectors[layer]), "last"):
                        logits = lm.model(input_ids=x).logits
            p = logits[0, -1].softmax(-1)
            total += float(p[good] / (p[good] + p[bad]))
        return total / len(enc)

    assert base == pytest.approx(naive(), abs=1e-5)
    for layer in vectors:
        assert scores[layer] == pytest.approx(naive(layer), abs=1e-5)
    assert scores[0] != pytest.approx(base, abs=1e-7)
