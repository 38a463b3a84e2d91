"""Inference-Time Intervention (Li, Patel, Viégas, Pfister, Wattenberg, NeurIPS 2023), pure tensors.

Per head: the mass-mean-shift direction θ = μ⁺ − μ⁻ (normalised), σ = the standard deviation of the
activations projected on θ, shift = α σ θ̂ on the K heads whose linear probes score best on validation data.
σ may come from another bank of activations than θ: ITI's reference code takes θ from ``"Q: {q} A: {a}"`` texts
and σ from ``"Q: {q} A: {a} Q: {another question}"`` texts (its ``tqa_gen_end_q`` features, unlabelled).
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


def iti_shift(acts: torch.Tensor, labels: torch.Tensor, heads: list[int], alpha: float,
              sigma_acts: torch.Tensor | None = None) -> torch.Tensor:
    """The shift ``[H, D]`` for one layer: α σ_h θ̂_h on ``heads``, zero elsewhere. ``acts: [N, H, D]``.

    θ comes from ``acts`` and ``labels``; σ from the projections of ``sigma_acts`` (``[M, H, D]``, no labels
    needed; default: ``acts`` themselves)."""
    direction = mean_difference(acts, labels)
    unit = direction / direction.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    bank = acts if sigma_acts is None else sigma_acts
    if sigma_acts is not None and (bank.shape[1:] != acts.shape[1:] or len(bank) < 2):
        raise ValueError(f"σ bank of shape {tuple(bank.shape)} does not fit activations {tuple(acts.shape)} "
                         "(needs the same heads and dims and at least 2 rows)")
    proj = torch.einsum("nhd,hd->nh", bank.float(), unit)
    sigma = proj.std(dim=0)
    shift = torch.zeros_like(unit)
    for h in heads:
        if not math.isfinite(float(sigma[h])):
            raise ValueError(f"σ of head {h} is not finite")
        shift[h] = alpha * sigma[h] * unit[h]
    return shift
