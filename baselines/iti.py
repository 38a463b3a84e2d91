"""Inference-Time Intervention (Li, Patel, Viégas, Pfister, Wattenberg, NeurIPS 2023), pure tensors.

Per head: the mass-mean-shift direction θ = μ⁺ − μ⁻ (normalised), σ = the standard deviation of the
activations projected on θ, shift = α σ θ̂ on the K heads whose linear probes score best on validation data.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch

from baselines.shift import mean_difference

#: Defaults from the ITI paper and its reference code: α = 15, K = 48 of Llama-7B's 32 × 32 = 1,024 heads.
DEFAULT_ALPHA = 15.0
DEFAULT_K_FRACTION = 48 / 1024


def default_k(n_layers: int, n_heads: int) -> int:
    """K for a model with fewer heads: the same share of all heads as ITI's 48 of 1,024 (at least 1)."""
    return max(1, round(DEFAULT_K_FRACTION * n_layers * n_heads))


def top_heads(accuracies: np.ndarray, k: int) -> list[tuple[int, int]]:
    """The ``k`` (layer, head) pairs with the highest probe accuracy, ``accuracies: [layers, heads]``.

    ``k`` larger than the number of heads is clamped, with a warning. Ties break toward lower indices.
    """
    total = accuracies.size
    if k < 1:
        raise ValueError(f"K must be ≥ 1, got {k}")
    if k > total:
        warnings.warn(f"K = {k} exceeds the {total} heads to choose from; using all {total}", RuntimeWarning,
                      stacklevel=2)
        k = total
    order = np.argsort(-accuracies.reshape(-1), kind="stable")[:k]
    return [(int(i // accuracies.shape[1]), int(i % accuracies.shape[1])) for i in order]


def iti_shift(acts: torch.Tensor, labels: torch.Tensor, heads: list[int], alpha: float) -> torch.Tensor:
    """The shift ``[H, D]`` for one layer: α σ_h θ̂_h on ``heads``, zero elsewhere. ``acts: [N, H, D]``."""
    direction = mean_difference(acts, labels)
    unit = direction / direction.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    proj = torch.einsum("nhd,hd->nh", acts.float(), unit)
    sigma = proj.std(dim=0)
    shift = torch.zeros_like(unit)
    for h in heads:
        if not math.isfinite(float(sigma[h])):
            raise ValueError(f"σ of head {h} is not finite")
        shift[h] = alpha * sigma[h] * unit[h]
    return shift
