import numpy as np
import pytest
import torch

from baselines.few_shot import few_shot_prefix
from baselines.iti import default_k, iti_shift, top_heads
from baselines.shift import AdditiveShift, mean_difference
from bench.data.truthfulqa import load_truthfulqa, make_folds
from bench.interventions import Intervention, get_method
from bench.methods import FitContext

FITTED = ["florain", "iti", "mean-shift", "caa", "lofit", "few-shot"]


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


def _ctx(lm, tqa_dir, method_options=None, fold=0):
    qs, _ = load_truthfulqa(tqa_dir, use_hub=False)
    f = make_folds(len(qs), 2, 0.2, 42)[fold]
    return FitContext(lm, qs, f, 1, "heads", {"epochs": 2, "rank": 2, "lam": 3.0, "iti_k": 3, "shots": 3,
                                              **(method_options or {})}), qs, f


@pytest.mark.parametrize("name", ["iti", "florain", "mean-shift"])
def test_fits_never_use_the_test_fold(name, tiny_llama, tqa_dir, monkeypatch):
    """Poisoning the test questions' activations changes nothing a method fits from activations."""
    ctx, qs, fold = _ctx(tiny_llama, tqa_dir)
    first = get_method(name).fit(ctx)
    test_ids = torch.tensor([qs[i].index for i in fold.test])
    real = FitContext.activations

    def poisoned(self, layers=None, site=None):
        acts, labels, groups = real(self, layers, site)
        mask = torch.isin(groups, test_ids)
        return {k: torch.where(mask[:, None, None], v * 100 + 7, v) for k, v in acts.items()}, labels, groups

    monkeypatch.setattr(FitContext, "activations", poisoned)
    assert bool(torch.isin(real(ctx)[2], test_ids).any())  # the poison reaches rows the fit could have read
    second = get_method(name).fit(ctx)
    assert first.layers == second.layers
    for layer in first.layers:
        a, b = first.modules[layer].state_dict(), second.modules[layer].state_dict()
        assert a.keys() == b.keys() and a
        for k in a:
            torch.testing.assert_close(a[k], b[k], msg=f"{name} layer {layer} {k} depends on the test fold")


def test_iti_restricted_to_one_layer_picks_its_heads_there_only(tiny_llama, tqa_dir):
    heads = tiny_llama.spec.n_heads
    ctx, _, _ = _ctx(tiny_llama, tqa_dir, {"iti_layer": 2, "iti_k": None})
    iv = get_method("iti").fit(ctx)
    assert iv.layers == [2] and iv.config["layer_restriction"] == 2
    # K defaults to ITI's share of that one layer's heads (at least 1), not to every head of the layer
    assert iv.config["k"] == default_k(1, heads) == 1 and all(lay == 2 for lay, _ in iv.config["heads_chosen"])
    assert len(iv.config["probe_val_accuracy"]) == 1
    wide = get_method("iti").fit(_ctx(tiny_llama, tqa_dir, {"iti_layer": 1, "iti_k": 3})[0])
    assert [lay for lay, _ in wide.config["heads_chosen"]] == [1, 1, 1]
    accs = wide.config["probe_val_accuracy"]
    assert accs == sorted(accs, reverse=True)  # aligned with heads_chosen, best first
    unrestricted = get_method("iti").fit(_ctx(tiny_llama, tqa_dir, {"iti_k": 1})[0])
    assert unrestricted.config["layer_restriction"] is None
    with pytest.raises(ValueError, match="layer"):
        get_method("iti").fit(_ctx(tiny_llama, tqa_dir, {"iti_layer": 99})[0])
    by_auc = get_method("iti").fit(_ctx(tiny_llama, tqa_dir, {"iti_layer": 1, "iti_k": 3, "iti_rank": "auroc"})[0])
    assert by_auc.config["probe_score"] == "auroc" and len(by_auc.config["probe_val_auroc"]) == 3
    assert all(0.0 <= a <= 1.0 for a in by_auc.config["probe_val_auroc"])


def test_few_shot_prompts_never_contain_test_questions(tiny_llama, tqa_dir):
    for fold in (0, 1):
        ctx, qs, f = _ctx(tiny_llama, tqa_dir, {"shots": 4}, fold)
        iv = get_method("few-shot").fit(ctx)
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
    iv = get_method(name).fit(ctx)
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
