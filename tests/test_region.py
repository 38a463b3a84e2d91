import numpy as np
import pytest
import torch
from sklearn.covariance import empirical_covariance

from florain.region import build_regions, pooled_covariance, shrink, stable_inverse


def _data(seed=0, n_q=6, heads=2, dim=3):
    g = torch.Generator().manual_seed(seed)
    acts, labels, groups = [], [], []
    for q in range(n_q):
        n_pos = 1 if q == 0 else 3  # question 0 has a single desirable answer: no region
        for lab, n in ((1, n_pos), (0, 2)):
            acts.append(torch.randn(n, heads, dim, generator=g, dtype=torch.float64) + lab)
            labels += [lab] * n
            groups += [q * 10] * n
    return torch.cat(acts), torch.tensor(labels), torch.tensor(groups)


def test_pooled_covariance_matches_per_question_mle():
    acts, labels, groups = _data()
    cov = pooled_covariance(acts, labels, groups)
    h = 1
    total = np.zeros((3, 3))
    n_total = 0
    for q in groups.unique():
        sel = (groups == q) & (labels == 1)
        x = acts[sel][:, h].numpy()
        total += len(x) * empirical_covariance(x)
        n_total += len(x)
    np.testing.assert_allclose(cov[h].numpy(), total / n_total, atol=1e-10)


def test_centres_of_both_extrapolation_forms_by_hand():
    """raw (the paper): m_q = μ_q⁺ + λ[α(μ_q⁺ − μ_q⁻) + (1 − α)(μ⁺ − μ⁻)]; unit (released code): unit vectors."""
    acts, labels, groups = _data()
    alpha, lam = 0.3, 2.0
    raw = build_regions(acts, labels, groups, alpha=alpha, lam=lam)  # the default form
    unit = build_regions(acts, labels, groups, alpha=alpha, lam=lam, extrapolation="unit")
    for q in raw.questions.tolist():
        i = raw.questions.tolist().index(q)
        for h in range(acts.shape[1]):
            pos = acts[(groups == q) & (labels == 1)][:, h].double()
            neg = acts[(groups == q) & (labels == 0)][:, h].double()
            glob = acts[labels == 1][:, h].double().mean(0) - acts[labels == 0][:, h].double().mean(0)
            d = pos.mean(0) - neg.mean(0)
            by_hand_raw = [pos.mean(0)[j] + lam * (alpha * d[j] + (1 - alpha) * glob[j]) for j in range(len(d))]
            torch.testing.assert_close(raw.centres[i, h].double(), torch.stack(by_hand_raw), atol=1e-5, rtol=1e-5)
            by_hand_unit = pos.mean(0) + lam * (alpha * d / d.norm() + (1 - alpha) * glob / glob.norm())
            torch.testing.assert_close(unit.centres[i, h].double(), by_hand_unit, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(raw.centres, unit.centres)
    torch.testing.assert_close(raw.rho, unit.rho)  # the radius is measured around μ_q⁺ in both forms
    with pytest.raises(ValueError, match="valid: raw, unit"):
        build_regions(acts, labels, groups, alpha=alpha, lam=lam, extrapolation="normalised")


def test_centres_radii_and_skipped_questions():
    acts, labels, groups = _data()
    alpha, lam = 0.3, 2.0
    r = build_regions(acts, labels, groups, alpha=alpha, lam=lam, extrapolation="unit")
    assert 0 not in r.questions.tolist() and len(r.questions) == 5
    q, h = 20, 0
    i = r.questions.tolist().index(q)
    pos = acts[(groups == q) & (labels == 1)][:, h]
    neg = acts[(groups == q) & (labels == 0)][:, h]
    mu_p, mu_n = pos.mean(0), neg.mean(0)
    glob = acts[labels == 1][:, h].mean(0) - acts[labels == 0][:, h].mean(0)
    d = mu_p - mu_n
    expected = mu_p + lam * (alpha * d / d.norm() + (1 - alpha) * glob / glob.norm())
    torch.testing.assert_close(r.centres[i, h].double(), expected, atol=1e-5, rtol=1e-5)
    prec = torch.linalg.inv(pooled_covariance(acts, labels, groups)[h])
    d2 = torch.stack([(x - mu_p) @ prec @ (x - mu_p) for x in pos])
    assert torch.isclose(r.rho[i, h].double(), d2.max(), rtol=1e-4)


def test_shrink_interpolates_to_diagonal():
    cov = torch.tensor([[2.0, 1.0], [1.0, 3.0]])
    assert torch.equal(shrink(cov, 1.0), cov)
    assert torch.equal(shrink(cov, 0.0), torch.diag(torch.tensor([2.0, 3.0])))
    assert torch.allclose(shrink(cov, 0.5), torch.tensor([[2.0, 0.5], [0.5, 3.0]]))
    with pytest.raises(ValueError, match="beta"):
        shrink(cov, 1.5)


def test_singular_covariance_gets_a_ridge_with_warning():
    cov = torch.tensor([[[1.0, 1.0], [1.0, 1.0]]], dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="ridge"):
        prec, ridge = stable_inverse(cov)
    assert ridge > 0 and torch.isfinite(prec).all()


def test_non_finite_activations_are_rejected():
    acts, labels, groups = _data()
    acts[3, 0, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        build_regions(acts, labels, groups, alpha=0.2, lam=1.0)
