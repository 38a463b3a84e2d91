"""A constant additive shift of per-head activations: the edit behind ITI, CAA and the mean-shift control."""

from __future__ import annotations

import torch
from torch import nn


class AdditiveShift(nn.Module):
    """``a ↦ a + shift`` for ``a: [..., H, D]``; heads whose shift is zero are untouched."""

    def __init__(self, shift: torch.Tensor):
        super().__init__()
        if shift.dim() != 2:
            raise ValueError(f"shift must be [heads, dim], got shape {tuple(shift.shape)}")
        self.register_buffer("shift", shift.detach().clone().float())

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return a + self.shift.to(device=a.device, dtype=a.dtype)


def mean_difference(acts: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """μ⁺ − μ⁻ over desirable (label 1) and undesirable (label 0) activations: ``[N, H, D] → [H, D]``."""
    pos = labels.bool()
    if not pos.any() or pos.all():
        raise ValueError("need both desirable and undesirable examples")
    return acts[pos].double().mean(0).float() - acts[~pos].double().mean(0).float()
