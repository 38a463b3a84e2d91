"""The desirable region: one Mahalanobis ellipsoid per training question, for every head at once.

For question q with desirable activations A_q⁺ and undesirable A_q⁻ (per head, dimension D):

* centre   m_q = μ_q⁺ + λ (α (μ_q⁺ − μ_q⁻) + (1 − α) (μ⁺ − μ⁻))            (``extrapolation="raw"``: the paper)
           m_q = μ_q⁺ + λ (α · unit(μ_q⁺ − μ_q⁻) + (1 − α) · unit(μ⁺ − μ⁻))  (``"unit"``: the released code)
* shape    Σ   = pooled within-question covariance of desirable activations (MLE per question,
             weighted by n_q⁺), shrunk toward its diagonal: Σ_β = β S + (1 − β) diag(S)
* radius   ρ_q = max_{x ∈ A_q⁺} (x − μ_q⁺)ᵀ Σ⁻¹ (x − μ_q⁺) / shrinking

Questions with fewer than two desirable (or no undesirable) answers get no region.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from florain.projection import mahalanobis_sq


@dataclass(frozen=True)
class Regions:
    """Per-question ellipsoids for all heads of a layer.

    ``centres: [Q, H, D]``, ``precision: [H, D, D]`` (Σ⁻¹, shared by all questions),
    ``rho: [Q, H]`` (squared radii), ``questions: [Q]`` (the group ids that have a region).
    """

    centres: torch.Tensor
    precision: torch.Tensor
    rho: torch.Tensor
    questions: torch.Tensor
    covariance: torch.Tensor
    ridge: float = 0.0


#: How the centre is extrapolated: ``raw`` mean differences (the paper summary's formula, λ a multiple of the
#: class-mean gaps, so scale-free) or ``unit`` vectors (the released code, λ in activation units).
EXTRAPOLATIONS = ("raw", "unit")


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def extrapolation_direction(question_diff: torch.Tensor, global_diff: torch.Tensor, alpha: float,
                            extrapolation: str = "raw") -> torch.Tensor:
    """α d_q + (1 − α) d (``raw``) or α unit(d_q) + (1 − α) unit(d) (``unit``); ``d_q: [Q, H, D]``, ``d: [H, D]``."""
    if extrapolation == "raw":
        return alpha * question_diff + (1.0 - alpha) * global_diff
    if extrapolation == "unit":
        return alpha * _unit(question_diff) + (1.0 - alpha) * _unit(global_diff)
    raise ValueError(f"unknown extrapolation {extrapolation!r}; valid: {', '.join(EXTRAPOLATIONS)}")


def group_means(
    acts: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-group means and counts of desirable and undesirable activations.

    ``acts: [N, H, D]``, ``labels: [N]`` (1 desirable), ``groups: [N]``. Returns
    ``(ids [G], mu_pos [G, H, D], mu_neg [G, H, D], n_pos [G], n_neg [G])``.
    """
    ids, inverse = torch.unique(groups, return_inverse=True)
    g = ids.numel()
    pos = labels.bool()
    flat = acts.reshape(acts.shape[0], -1).to(torch.float64)
    n_pos = torch.zeros(g, dtype=torch.float64).index_add_(0, inverse[pos], torch.ones(int(pos.sum()), dtype=torch.float64))
    n_neg = torch.zeros(g, dtype=torch.float64).index_add_(0, inverse[~pos], torch.ones(int((~pos).sum()), dtype=torch.float64))
    s_pos = torch.zeros(g, flat.shape[1], dtype=torch.float64).index_add_(0, inverse[pos], flat[pos])
    s_neg = torch.zeros(g, flat.shape[1], dtype=torch.float64).index_add_(0, inverse[~pos], flat[~pos])
    mu_pos = (s_pos / n_pos.clamp_min(1).unsqueeze(1)).reshape(g, *acts.shape[1:])
    mu_neg = (s_neg / n_neg.clamp_min(1).unsqueeze(1)).reshape(g, *acts.shape[1:])
    return ids, mu_pos, mu_neg, n_pos, n_neg


def pooled_covariance(acts: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Pooled within-question covariance of the desirable activations, ``[H, D, D]`` (float64).

    Σ = Σ_q n_q⁺ Ĉ_q / Σ_q n_q⁺ with Ĉ_q the maximum-likelihood covariance of q's desirable points.
    """
    ids, inverse = torch.unique(groups, return_inverse=True)
    pos = labels.bool()
    _, mu_pos, _, _, _ = group_means(acts, labels, groups)
    centred = acts[pos].to(torch.float64) - mu_pos[inverse[pos]]
    return torch.einsum("nhi,nhj->hij", centred, centred) / max(int(pos.sum()), 1)


def shrink(cov: torch.Tensor, beta: float) -> torch.Tensor:
    """Σ_β = β Σ + (1 − β) diag(Σ); β = 1 keeps Σ (the released code), β = 0 keeps its diagonal."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must lie in [0, 1], got {beta}")
    diag = torch.diag_embed(torch.diagonal(cov, dim1=-2, dim2=-1))
    return beta * cov + (1.0 - beta) * diag


def stable_inverse(cov: torch.Tensor, rel_ridge: float = 1e-6, max_tries: int = 8) -> tuple[torch.Tensor, float]:
    """Inverse of each ``[D, D]`` block; adds a growing ridge (and warns) if a block is singular.

    Returns ``(precision, ridge)`` where ``ridge`` is the relative ridge finally used (0 if none).
    """
    eye = torch.eye(cov.shape[-1], dtype=cov.dtype)
    scale = torch.diagonal(cov, dim1=-2, dim2=-1).mean(-1).clamp_min(1e-30)[..., None, None]
    ridge = 0.0
    for attempt in range(max_tries + 1):
        chol, info = torch.linalg.cholesky_ex(cov + ridge * scale * eye)
        if int(info.max()) == 0:
            if ridge > 0:
                warnings.warn(
                    f"covariance is singular (fewer desirable answers than dimensions, or collinear ones); added a "
                    f"ridge of {ridge:g} × mean variance to invert it. Directions outside the data's span are then "
                    f"weighted ~1/ridge: prefer beta < 1 (shrinkage toward the diagonal) or more training questions",
                    RuntimeWarning,
                    stacklevel=2,
                )
            return torch.cholesky_inverse(chol), ridge
        ridge = rel_ridge * (10.0**attempt)
    raise ValueError("covariance could not be inverted even with a ridge; the activations are degenerate")


def build_regions(
    acts: torch.Tensor,
    labels: torch.Tensor,
    groups: torch.Tensor,
    *,
    alpha: float,
    lam: float,
    beta: float = 1.0,
    shrinking: float = 1.0,
    covariance: torch.Tensor | None = None,
    global_direction: torch.Tensor | None = None,
    extrapolation: str = "raw",
) -> Regions:
    """Ellipsoids for every group in ``groups`` that has ≥ 2 desirable and ≥ 1 undesirable answer.

    ``acts: [N, H, D]``. ``covariance`` ([H, D, D], already shrunk) and ``global_direction``
    ([H, D], μ⁺ − μ⁻) default to the statistics of ``acts`` itself; pass the training fold's
    statistics when building validation regions. ``extrapolation``: see :data:`EXTRAPOLATIONS`.
    """
    if extrapolation not in EXTRAPOLATIONS:
        raise ValueError(f"unknown extrapolation {extrapolation!r}; valid: {', '.join(EXTRAPOLATIONS)}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    if shrinking <= 0:
        raise ValueError(f"shrinking must be positive, got {shrinking}")
    if not torch.isfinite(acts).all():
        raise ValueError("activations contain NaN or Inf values")
    ids, mu_pos, mu_neg, n_pos, n_neg = group_means(acts, labels, groups)
    if covariance is None:
        covariance = shrink(pooled_covariance(acts, labels, groups), beta)
    precision, ridge = stable_inverse(covariance.to(torch.float64))
    if global_direction is None:
        pos = labels.bool()
        global_direction = acts[pos].to(torch.float64).mean(0) - acts[~pos].to(torch.float64).mean(0)
    keep = (n_pos >= 2) & (n_neg >= 1)
    ids, mu_pos, mu_neg = ids[keep], mu_pos[keep], mu_neg[keep]
    direction = extrapolation_direction(mu_pos - mu_neg, global_direction.to(torch.float64), alpha, extrapolation)
    centres = mu_pos + lam * direction

    # ρ_q: largest squared distance of q's desirable points to μ_q⁺ (not to the shifted centre).
    idx = {int(q): i for i, q in enumerate(ids)}
    rho = torch.zeros(len(ids), acts.shape[1], dtype=torch.float64)
    pos_rows = [(i, idx[int(groups[i])]) for i in range(len(groups)) if labels[i] and int(groups[i]) in idx]
    if pos_rows:
        rows = torch.tensor([r for r, _ in pos_rows])
        owner = torch.tensor([o for _, o in pos_rows])
        d2 = mahalanobis_sq(acts[rows].to(torch.float64), mu_pos[owner], precision)  # [n, H]
        rho = rho.scatter_reduce_(0, owner[:, None].expand_as(d2), d2, "amax", include_self=True)
    rho = rho / shrinking
    return Regions(
        centres=centres.float(),
        precision=precision.float(),
        rho=rho.float(),
        questions=ids,
        covariance=covariance.float(),
        ridge=ridge,
    )
