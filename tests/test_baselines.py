import json

import numpy as np
import pytest
import torch

from baselines.few_shot import few_shot_prefix
from baselines.iti import default_k, iti_shift, top_heads
from baselines.shift import AdditiveShift, mean_difference
from bench.data.truthfulqa import load_truthfulqa, make_folds
from bench.interventions import Intervention, get_method
from bench.methods import FitContext

FITTED = ["florain", "iti", "mean-shift", "caa", "mean-diff-resid", "lofit", "few-shot"]


def test_iti_direction_is_the_mass_mean_difference_and_shift_is_alpha_sigma():
    g = torch.Generator().manual_seed(0)
    acts = torch.randn(50, 3, 4, generator=g)
    labels = torch.tensor([1, 0] * 25)
    by_hand = acts[labels == 1].mean(0) - acts[labels == 0].mean(0)
    torch.testing.assert_close(mean_difference(acts, labels), by_hand)
    shift = iti_shift(acts, labels, heads=[0, 2], alpha=15.0)
    unit = by_hand / by_hand.norm(dim=-1, keepdim=True)
    sigma = (acts * unit).sum(-1).std(0)
    torch.testing.assert_close(shift[0], 15.0 * sigma[0] * unit[0])
    torch.testing.assert_close(shift[2], 15.0 * sigma[2] * unit[2])
    assert torch.equal(shift[1], torch.zeros(4))


def test_top_heads_and_k_clamping():
    accs = np.array([[0.5, 0.9], [0.7, 0.6]])
    assert top_heads(accs, 2) == [(0, 1), (1, 0)]
    with pytest.warns(RuntimeWarning, match="exceeds"):
        assert len(top_heads(accs, 10)) == 4
    assert default_k(32, 32) == 48 and default_k(30, 9) == 13 and default_k(1, 2) == 1 and default_k(1, 32) == 2


#: Short settings per method (a fit checks its options strictly, so each method gets its own).
FAST = {"florain": {"epochs": 2, "rank": 2, "lam": 3.0}, "iti": {"k": 3}, "few-shot": {"shots": 3}}


def _ctx(lm, tqa_dir, method_options=None, fold=0):
    """A context whose options are a test's own settings (``_fit`` adds the method's short ones)."""
    qs, _ = load_truthfulqa(tqa_dir, use_hub=False)
    f = make_folds(len(qs), 2, 0.2, 42)[fold]
    return FitContext(lm, qs, f, 1, "heads", dict(method_options or {})), qs, f


def _fit(name, ctx):
    """Fit ``name`` with its short settings, overridden by the context's options that are its own."""
    from dataclasses import replace

    from bench.options import specs

    own = {s.name for s in specs(get_method(name).options)}
    options = {**FAST.get(name, {}), **{k: v for k, v in ctx.options.items() if k in own}}
    return get_method(name).fit(replace(ctx, options=options))


@pytest.mark.parametrize("name", ["iti", "florain", "mean-shift"])
def test_fits_never_use_the_test_fold(name, tiny_llama, tqa_dir, monkeypatch):
    """Poisoning the test questions' activations changes nothing a method fits from activations."""
    ctx, qs, fold = _ctx(tiny_llama, tqa_dir)
    first = _fit(name, ctx)
    test_ids = torch.tensor([qs[i].index for i in fold.test])
    real = FitContext.activations

    def poisoned(self, layers=None, site=None):
        acts, labels, groups = real(self, layers, site)
        mask = torch.isin(groups, test_ids)
        return {k: torch.where(mask[:, None, None], v * 100 + 7, v) for k, v in acts.items()}, labels, groups

    monkeypatch.setattr(FitContext, "activations", poisoned)
    assert bool(torch.isin(real(ctx)[2], test_ids).any())  # the poison reaches rows the fit could have read
    second = _fit(name, ctx)
    assert first.layers == second.layers
    for layer in first.layers:
        a, b = first.modules[layer].state_dict(), second.modules[layer].state_dict()
        assert a.keys() == b.keys() and a
        for k in a:
            torch.testing.assert_close(a[k], b[k], msg=f"{name} layer {layer} {k} depends on the test fold")


def _poison_test_questions(qs, fold):
    """The same questions with every test question's text and answers replaced (true and false swapped)."""
    from dataclasses import replace

    test = set(fold.test)
    return [replace(q, question=q.question + " Or not?", best_answer=q.incorrect[0], correct=q.incorrect,
                    incorrect=q.correct) if i in test else q for i, q in enumerate(qs)]


def _registered() -> list[str]:
    from bench.interventions import METHODS

    get_method("none")  # imports bench.methods, which registers the built-in methods
    return sorted(METHODS)


@pytest.mark.parametrize("name", _registered())
def test_no_fit_reads_a_test_question(name, tiny_llama, tqa_dir):
    """Every registered method fits the same intervention when the test questions' texts and labels change."""
    ctx, qs, fold = _ctx(tiny_llama, tqa_dir)
    first = _fit(name, ctx)
    ctx.questions = _poison_test_questions(qs, fold)
    second = _fit(name, ctx)
    if first is None:
        assert second is None
        return
    # the poisoned texts change the capture batches' padding, hence float rounding (≈1e-6), nothing more
    a, b = _flat(first.config), _flat(second.config)
    assert a.keys() == b.keys()
    for k in a:
        number = isinstance(a[k], float) and not isinstance(a[k], bool)
        assert a[k] == (pytest.approx(b[k], rel=1e-4, abs=1e-6) if number else b[k]), f"{name} config {k}"
    assert first.prompt_prefix == second.prompt_prefix and first.layers == second.layers
    for layer in first.layers:
        a, b = first.modules[layer].state_dict(), second.modules[layer].state_dict()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6,
                                       msg=f"{name} layer {layer} {k} depends on the test fold")


def _flat(value, key: str = "") -> dict:
    """A nested config as ``{path: leaf}`` (numbers compared approximately, everything else exactly)."""
    if isinstance(value, dict):
        return {k: v for sub, item in value.items() for k, v in _flat(item, f"{key}.{sub}").items()}
    if isinstance(value, (list, tuple)):
        return {k: v for i, item in enumerate(value) for k, v in _flat(item, f"{key}[{i}]").items()}
    return {key: value}


def test_layer_selection_never_reads_a_test_question(tiny_llama, tqa_dir):
    """The per-fold probe rule (the layer of FLORAIN, mean-shift and any method that needs one) uses the fold's
    training/validation questions only."""
    from bench.methods import probe_layer

    ctx, qs, fold = _ctx(tiny_llama, tqa_dir)
    scores = ctx.layer_probe_scores()
    assert scores.shape == (tiny_llama.spec.n_layers, tiny_llama.spec.n_heads)
    ctx.questions = _poison_test_questions(qs, fold)
    poisoned = ctx.layer_probe_scores()
    np.testing.assert_array_equal(scores, poisoned)
    assert probe_layer(scores) == int(np.argmax(scores.mean(1)))
    ctx.questions = [_poison_test_questions(qs, make_folds(len(qs), 2, 0.2, 42)[1])[i] for i in range(len(qs))]
    assert not np.array_equal(scores, ctx.layer_probe_scores())  # poisoning the training fold does change it


def test_iti_restricted_to_one_layer_picks_its_heads_there_only(tiny_llama, tqa_dir):
    heads = tiny_llama.spec.n_heads
    ctx, _, _ = _ctx(tiny_llama, tqa_dir, {"layer": 2, "k": None})
    iv = _fit("iti", ctx)
    assert iv.layers == [2] and iv.config["layer_restriction"] == 2
    # K defaults to ITI's share of that one layer's heads (at least 1), not to every head of the layer
    assert iv.config["k"] == default_k(1, heads) == 1 and all(lay == 2 for lay, _ in iv.config["heads_chosen"])
    assert len(iv.config["probe_val_accuracy"]) == 1
    wide = _fit("iti", _ctx(tiny_llama, tqa_dir, {"layer": 1, "k": 3})[0])
    assert [lay for lay, _ in wide.config["heads_chosen"]] == [1, 1, 1]
    accs = wide.config["probe_val_accuracy"]
    assert accs == sorted(accs, reverse=True)  # aligned with heads_chosen, best first
    unrestricted = _fit("iti", _ctx(tiny_llama, tqa_dir, {"k": 1})[0])
    assert unrestricted.config["layer_restriction"] is None
    with pytest.raises(ValueError, match="layer"):
        _fit("iti", _ctx(tiny_llama, tqa_dir, {"layer": 99})[0])
    by_auc = _fit("iti", _ctx(tiny_llama, tqa_dir, {"layer": 1, "k": 3, "rank": "auroc"})[0])
    assert by_auc.config["probe_score"] == "auroc" and len(by_auc.config["probe_val_auroc"]) == 3
    assert all(0.0 <= a <= 1.0 for a in by_auc.config["probe_val_auroc"])


def test_few_shot_prompts_never_contain_test_questions(tiny_llama, tqa_dir):
    for fold in (0, 1):
        ctx, qs, f = _ctx(tiny_llama, tqa_dir, {"shots": 4}, fold)
        iv = _fit("few-shot", ctx)
        assert iv.prompt_prefix.count("Q: ") == 4
        for i in f.test:
            assert qs[i].question not in iv.prompt_prefix
    with pytest.raises(ValueError, match="only"):
        few_shot_prefix([("q", "a")], 3)


def test_a_batch_of_different_prompts_is_shifted_in_every_row(tiny_llama):
    lm = tiny_llama
    heads, dim = lm.spec.site_shape("heads")
    iv = Intervention("iti", "heads", {1: AdditiveShift(torch.full((heads, dim), 3.0))}, {"heads": heads, "head_dim": dim})
    enc = lm.tokenizer(["Q: Why? A: No.", "Q: Is the sky blue? A: Yes.", "Q: Where? A: Paris.", "Q: Who? A: Me."],
                       return_tensors="pt", padding=True)
    with torch.no_grad():
        base = lm.model(**enc).logits
        with iv.applied(lm):
            shifted = lm.model(**enc).logits
    for row in range(4):
        assert not torch.allclose(base[row], shifted[row])


@pytest.mark.parametrize("name", FITTED)
def test_save_load_identical_and_hooks_removed_after_errors(name, tiny_llama, tqa_dir, tmp_path):
    lm = tiny_llama
    ctx, _, _ = _ctx(lm, tqa_dir)
    iv = _fit(name, ctx)
    iv.save_pretrained(tmp_path / name)
    loaded = Intervention.from_pretrained(tmp_path / name)
    assert loaded.prompt_prefix == iv.prompt_prefix and loaded.layers == iv.layers
    enc = lm.tokenizer([iv.prompt_prefix + "Q: Why? A: Because."], return_tensors="pt")
    with torch.no_grad():
        base = lm.model(**enc).logits
        with iv.applied(lm):
            a = lm.model(**enc).logits
        with loaded.applied(lm):
            b = lm.model(**enc).logits
    assert torch.equal(a, b)
    if iv.modules:
        assert not torch.equal(a, base)
    with pytest.raises(RuntimeError):
        with loaded.applied(lm):
            raise RuntimeError("boom")
    with torch.no_grad():
        assert torch.equal(lm.model(**enc).logits, base)


def test_additive_shift_follows_the_activations_dtype():
    shift = AdditiveShift(torch.tensor([[1.0, 0.0], [0.0, 0.5]]))
    a = torch.zeros(2, 2, 2, dtype=torch.float64)
    out = shift(a)
    assert out.dtype == torch.float64 and out.device == a.device
    torch.testing.assert_close(out[1], torch.tensor([[1.0, 0.0], [0.0, 0.5]], dtype=torch.float64))


def test_mean_shift_matched_to_florain_moves_as_far_as_its_mean_edit(tiny_llama, tqa_dir, tmp_path):
    """``shift_match``: each head's μ⁺ − μ⁻ keeps its direction and takes the norm of FLORAIN's mean edit."""
    ctx, _, fold = _ctx(tiny_llama, tqa_dir)
    florain = _fit("florain", ctx)
    florain.save_pretrained(tmp_path / "run" / f"intervention_fold{fold.fold}")
    marker = tmp_path / "run" / "run_config.json"
    marker.write_text(json.dumps({"config": {"folds": 2, "val_ratio": 0.2, "seed": 42}}))
    plain = _fit("mean-shift", ctx)
    ctx.options["match"] = str(tmp_path / "run")
    matched = _fit("mean-shift", ctx)
    acts, labels, groups = ctx.activations()
    rows = ctx.split(groups, "train") | ctx.split(groups, "val")
    with torch.no_grad():
        edit = florain.modules[ctx.layer].delta(acts[ctx.layer][rows]).mean(0).norm(dim=-1)
    a, b = plain.modules[ctx.layer].shift, matched.modules[ctx.layer].shift
    torch.testing.assert_close(b.norm(dim=-1), edit, rtol=1e-4, atol=1e-6)
    cos = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))
    torch.testing.assert_close(cos, torch.ones_like(cos), rtol=1e-4, atol=1e-4)
    assert matched.config["matched_to"] == str(tmp_path / "run")
    ctx.options["match"] = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="intervention_fold0"):
        _fit("mean-shift", ctx)
    ctx.options["match"] = str(tmp_path / "run")
    ctx.options["scale"] = 2.0  # the scale multiplies the matched shift
    torch.testing.assert_close(_fit("mean-shift", ctx).modules[ctx.layer].shift, 2 * b)
    marker.write_text(json.dumps({"config": {"folds": 2, "val_ratio": 0.2, "seed": 7}}))
    with pytest.raises(ValueError, match="fold split"):  # fitted on another split: could have seen test questions
        _fit("mean-shift", ctx)
    ctx.layer = 0
    with pytest.raises(ValueError, match="layers \\[1\\]"):
        _fit("mean-shift", ctx)


def test_probe_scores_are_cached_per_layer_and_keyed_by_the_split(tiny_llama, tqa_dir, monkeypatch):
    """ITI's head ranking and the layer rule share one probe fit per (capture, labels, split, seed, score)."""
    import bench.methods.context as methods

    ctx, _, _ = _ctx(tiny_llama, tqa_dir)
    first = ctx.probe_scores([0, 2], seed=7)
    calls = []
    real = methods.head_probe_accuracies
    monkeypatch.setattr(methods, "head_probe_accuracies", lambda *a, **k: calls.append(1) or real(*a, **k))
    np.testing.assert_array_equal(ctx.probe_scores([0, 2], seed=7), first)
    assert calls == []  # read from the cache
    np.testing.assert_array_equal(ctx.layer_probe_scores(seed=7)[[0, 2]], first)
    assert len(calls) == tiny_llama.spec.n_layers - 2  # only the layers not cached yet
    other, _, _ = _ctx(tiny_llama, tqa_dir, fold=1)
    other.probe_scores([0], seed=7)
    assert len(calls) == tiny_llama.spec.n_layers - 1  # another split is another fit
