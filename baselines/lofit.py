"""LoFiT (Yin, Ye, Durrett, NeurIPS 2024): learned per-head scaling and bias offsets on attention-head outputs.

Edit of head h: z ↦ (1 + A_h) ⊙ z + v_h. Stage 1 learns A on every head with an L1 penalty and keeps the K
heads with the largest ‖A_h‖; stage 2 learns the offsets v on those heads only (A reset to 0), as in the paper's
final intervention. The training loop needs a model, so it lives in the harness; this module is pure.
"""

from __future__ import annotations

import torch
from torch import nn

#: Defaults chosen here (the paper tunes K and λ per task): 10 % of the heads, L1 weight 1e-3,
#: Adam lr 5e-3, one epoch for head selection and two for the offsets, batch 8.
DEFAULT_K_FRACTION = 0.10
DEFAULT_L1 = 1e-3
DEFAULT_LR = 5e-3
DEFAULT_EPOCHS = (1, 2)
DEFAULT_BATCH = 8


class HeadScaleBias(nn.Module):
    """``a ↦ (1 + A ⊙ m) ⊙ a + v ⊙ m`` for ``a: [..., H, D]``; ``m`` masks the heads that are edited."""

    def __init__(self, n_heads: int, head_dim: int):
        super().__init__()
        self.A = nn.Parameter(torch.zeros(n_heads, head_dim))
        self.v = nn.Parameter(torch.zeros(n_heads, head_dim))
        self.register_buffer("head_mask", torch.ones(n_heads, 1))

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        m = self.head_mask.to(a.dtype)
        return (1 + self.A.to(a.dtype) * m) * a + self.v.to(a.dtype) * m


def l1_penalty(modules: dict[int, HeadScaleBias]) -> torch.Tensor:
    return sum(m.A.abs().sum() for m in modules.values())


def select_heads(modules: dict[int, HeadScaleBias], k: int) -> list[tuple[int, int]]:
    """The ``k`` (layer, head) pairs with the largest ‖A_h‖ after stage 1."""
    scores = [(float(m.A[h].detach().norm()), layer, h) for layer, m in modules.items() for h in range(m.A.shape[0])]
    if k < 1:
        raise ValueError(f"K must be ≥ 1, got {k}")
    scores.sort(key=lambda t: (-t[0], t[1], t[2]))
    return [(layer, h) for _, layer, h in scores[: min(k, len(scores))]]
