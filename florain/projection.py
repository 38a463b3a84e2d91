"""Mahalanobis geometry of the desirable region: norms, closed-form projection, hinge loss.

Under the metric d(x, y) = ||x - y||_{Σ⁻¹} = sqrt((x - y)ᵀ Σ⁻¹ (x - y)) the ellipsoid
E = {z : (z - m)ᵀ Σ⁻¹ (z - m) ≤ ρ} is a ball of radius √ρ around m, so the projection onto it is a
radial shrink toward m and needs no root finding.

Shapes: ``x, centre: [..., D]``, ``precision: [..., D, D]`` (Σ⁻¹, broadcast over the leading dims),
``rho: [...]`` (squared radius).
"""

from __future__ import annotations

import torch

#: Added under the square root so the gradient of the norm is finite at the centre.
SQRT_EPS = 1e-12


def mahalanobis_sq(x: torch.Tensor, centre: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """Squared Mahalanobis distance ``(x - centre)ᵀ precision (x - centre)``: ``[...]``."""
    diff = x - centre
    return torch.einsum("...i,...ij,...j->...", diff, precision, diff)


def mahalanobis(x: torch.Tensor, centre: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """Mahalanobis distance, with :data:`SQRT_EPS` inside the root for a finite gradient."""
    return torch.sqrt(mahalanobis_sq(x, centre, precision).clamp_min(0.0) + SQRT_EPS)


def project(
    x: torch.Tensor, centre: torch.Tensor, precision: torch.Tensor, rho: torch.Tensor
) -> torch.Tensor:
    """Closest point of the ellipsoid to ``x`` in the Mahalanobis metric (``x`` itself if inside)."""
    dist = torch.sqrt(mahalanobis_sq(x, centre, precision).clamp_min(0.0))
    radius = torch.sqrt(rho)
    scale = torch.where(dist > radius, radius / dist.clamp_min(torch.finfo(x.dtype).tiny), 1.0)
    return centre + scale.unsqueeze(-1) * (x - centre)


def projection_distance(
    x: torch.Tensor, centre: torch.Tensor, precision: torch.Tensor, rho: torch.Tensor
) -> torch.Tensor:
    """Mahalanobis distance from ``x`` to its projection: ``max(0, ||x - m||_{Σ⁻¹} - √ρ)``."""
    return torch.relu(mahalanobis(x, centre, precision) - torch.sqrt(rho))


def hinge_loss(
    x: torch.Tensor, centre: torch.Tensor, precision: torch.Tensor, rho: torch.Tensor
) -> torch.Tensor:
    """Squared projection distance per element, ``[...]``: FLORAIN's smooth (C¹) objective term."""
    return projection_distance(x, centre, precision, rho).square()
