import pytest
import torch

from florain import FlorainConfig, LowRankHeadMap, fit_florain
from florain.region import build_regions, pooled_covariance, shrink
from florain.train import per_head_loss, training_pairs


def test_map_equals_explicit_low_rank_matrix():
    torch.manual_seed(0)
    m = LowRankHeadMap(3, 5, 2)
    with torch.no_grad():
        m.B.normal_()
        m.s.normal_()
    a = torch.randn(7, 3, 5)
    out = m(a)
    for n in range(7):
        for h in range(3):
            L = torch.tanh(m.W[h] * a[n, h].unsqueeze(-1) + m.B[h])  # [D, k]
            expected = a[n, h] + L @ m.R[h].T @ a[n, h] + m.s[h]
            torch.testing.assert_close(out[n, h], expected, atol=1e-5, rtol=1e-5)
    m.drop_identity = True
    torch.testing.assert_close(m(a), out - a, atol=1e-5, rtol=1e-5)


def test_init_follows_the_released_code():
    m = LowRankHeadMap(2, 16, 4, generator=torch.Generator().manual_seed(0))
    assert m.W.abs().max() <= 0.5 and m.R.abs().max() <= 0.5  # U(±1/√k), k = 4
    assert torch.equal(m.B, torch.zeros_like(m.B)) and torch.equal(m.s, torch.zeros_like(m.s))
    a = torch.randn(3, 2, 16)
    assert not torch.allclose(m(a), a)  # rank-k term is active at init


def _synthetic(seed: int, n_q: int = 30, heads: int = 2, dim: int = 4):
    g = torch.Generator().manual_seed(seed)
    acts, labels, groups = [], [], []
    for q in range(n_q):
        centre = torch.randn(heads, dim, generator=g)
        acts.append(centre + 0.3 * torch.randn(3, heads, dim, generator=g) + 1.0)
        acts.append(centre + 0.3 * torch.randn(3, heads, dim, generator=g) - 1.0)
        labels += [1, 1, 1, 0, 0, 0]
        groups += [q] * 6
    return torch.cat(acts), torch.tensor(labels), torch.tensor(groups)


def test_training_reduces_the_loss_and_keeps_the_best_epoch_per_head():
    acts, labels, groups = _synthetic(0)
    tr, va = groups < 24, groups >= 24
    cfg = FlorainConfig(rank=4, alpha=0.5, lam=1.0, epochs=40, lr=1e-2, batch_size=32)
    fitted = fit_florain(acts[tr], labels[tr], groups[tr], acts[va], labels[va], groups[va], cfg)
    curve = torch.tensor(fitted.train.train_loss)
    assert curve[-1].mean() < 0.5 * curve[0].mean()
    rows, owner = training_pairs(groups[tr], fitted.regions)
    before = per_head_loss(LowRankHeadMap(2, 4, 4, torch.Generator().manual_seed(cfg.seed)), acts[tr][rows], owner, fitted.regions)
    after = per_head_loss(fitted.mapping, acts[tr][rows], owner, fitted.regions)
    assert after.mean() < before.mean()
    val_curve = torch.tensor(fitted.train.val_loss)
    assert fitted.train.best_epoch == val_curve.argmin(0).tolist()



def test_each_head_is_restored_to_its_best_validation_epoch():
    """Validation questions whose labels are flipped pull the other way, so the best epochs are early ones; the
    restored map then scores exactly each head's best validation loss."""
    acts, labels, groups = _synthetic(3)
    tr, va = groups < 24, groups >= 24
    cfg = FlorainConfig(rank=4, alpha=0.5, lam=1.0, epochs=30, lr=1e-2, batch_size=32)
    fitted = fit_florain(acts[tr], labels[tr], groups[tr], acts[va], 1 - labels[va], groups[va], cfg)
    val_curve = torch.tensor(fitted.train.val_loss)
    assert min(fitted.train.best_epoch) < cfg.epochs - 1  # a restore that differs from the last epoch
    vrows, vowner = training_pairs(groups[va], fitted.val_regions)
    restored = per_head_loss(fitted.mapping, acts[va][vrows], vowner, fitted.val_regions).mean(0)
    torch.testing.assert_close(restored, val_curve.min(0).values, atol=1e-5, rtol=1e-5)


def test_validation_regions_use_the_training_geometry_exactly():
    """Validation regions are built with the training fold's float64 Σ and μ⁺ − μ⁻: with an ill-conditioned Σ
    the validation precision is the training precision bit for bit (re-inverting a float32-rounded Σ was not)."""
    acts, labels, groups = _synthetic(4)
    acts[..., 3] = acts[..., 2] + 1e-3 * acts[..., 3]  # nearly collinear dimensions: κ(Σ) ≈ 1e6
    tr, va = groups < 24, groups >= 24
    cfg = FlorainConfig(rank=2, alpha=0.5, lam=1.0, epochs=1)
    fitted = fit_florain(acts[tr], labels[tr], groups[tr], acts[va], labels[va], groups[va], cfg)
    cov = shrink(pooled_covariance(acts[tr], labels[tr], groups[tr]), cfg.beta)
    pos = labels[tr].bool()
    direction = acts[tr][pos].double().mean(0) - acts[tr][~pos].double().mean(0)
    val = build_regions(acts[va], labels[va], groups[va], alpha=cfg.alpha, lam=fitted.lam, covariance=cov,
                        global_direction=direction)
    for field in ("precision", "centres", "rho"):
        assert torch.equal(getattr(fitted.val_regions, field), getattr(val, field)), field
    assert torch.equal(fitted.val_regions.precision, fitted.regions.precision)
    assert fit_florain(acts[tr], labels[tr], groups[tr], acts[:0], labels[:0], groups[:0], cfg).val_regions is None


def test_training_is_seeded():
    acts, labels, groups = _synthetic(1, n_q=10)
    cfg = FlorainConfig(rank=2, lam=0.5, epochs=3, lr=1e-2)
    e = torch.empty(0, 2, 4), torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long)
    a = fit_florain(acts, labels, groups, *e, cfg).mapping
    b = fit_florain(acts, labels, groups, *e, cfg).mapping
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_lambda_defaults_of_both_forms():
    """raw (default): λ = 5, a multiple of the mean differences (paper); unit: λ in activation units, by default
    the released λ = 30 over Llama-7B's mean head norm 1.8 times this data's mean head norm."""
    from florain import PAPER_LAM, RELEASED_LAM_SCALE, resolve_lambda

    acts, labels, groups = _synthetic(2, n_q=5)
    r1 = build_regions(acts, labels, groups, alpha=0.0, lam=0.0, extrapolation="unit")
    r2 = build_regions(acts, labels, groups, alpha=0.0, lam=2.0, extrapolation="unit")
    shift = (r2.centres - r1.centres).norm(dim=-1)
    torch.testing.assert_close(shift, torch.full_like(shift, 2.0), atol=1e-4, rtol=1e-4)
    norm = float(acts.norm(dim=-1).mean())
    assert FlorainConfig().extrapolation == "raw" and FlorainConfig().alpha == 0.2
    assert resolve_lambda(acts, FlorainConfig()) == PAPER_LAM == 5.0
    assert resolve_lambda(acts, FlorainConfig(extrapolation="unit")) == pytest.approx(RELEASED_LAM_SCALE * norm)
    assert resolve_lambda(acts, FlorainConfig(extrapolation="unit", lam_scale=2.0)) == pytest.approx(2.0 * norm)
    assert resolve_lambda(acts, FlorainConfig(lam=3.0)) == 3.0
    with pytest.raises(ValueError, match="lam_scale .* belongs to the released form"):
        FlorainConfig(lam_scale=2.0)
    with pytest.raises(ValueError, match="valid: raw, unit"):
        FlorainConfig(extrapolation="scaled")


def test_fit_reports_how_far_the_map_gets():
    """Shares of training and validation f(a) inside their ellipsoid, before and after, per head."""
    acts, labels, groups = _synthetic(2)
    tr, va = groups < 24, groups >= 24
    fitted = fit_florain(acts[tr], labels[tr], groups[tr], acts[va], labels[va], groups[va],
                         FlorainConfig(rank=2, lam=1.0, epochs=300, lr=3e-2))
    d = fitted.diagnostics
    assert set(d) == {"train_inside", "val_inside"}
    for part in d.values():
        assert len(part["before"]) == len(part["after"]) == 2
        assert all(0.0 <= x <= 1.0 for x in part["before"] + part["after"])
    assert sum(d["train_inside"]["after"]) > sum(d["train_inside"]["before"])  # the map moves points inside
