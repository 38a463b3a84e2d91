"""FLORAIN's sample-wise nonlinear low-rank map, for all heads of one layer at once.

For head h with activation a ∈ R^D and rank k:

    f_h(a) = a + tanh(W_h ⊙ a 1ᵀ + B_h) (R_hᵀ a) + s_h,     W_h, B_h, R_h ∈ R^{D×k}, s_h ∈ R^D

computed as u = R_hᵀ a (k values), then tanh(...) u: O(D k) per head and token, never a D×D matrix.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class LowRankHeadMap(nn.Module):
    """The map f for ``n_heads`` heads of dimension ``head_dim``; input and output ``[..., H, D]``.

    ``drop_identity=True`` reproduces the released code's inference bug (returns f(a) − a).
    """

    def __init__(self, n_heads: int, head_dim: int, rank: int, generator: torch.Generator | None = None):
        super().__init__()
        if min(n_heads, head_dim, rank) < 1:
            raise ValueError(f"n_heads, head_dim and rank must be ≥ 1, got {n_heads}, {head_dim}, {rank}")
        bound = 1.0 / math.sqrt(rank)  # kaiming_uniform(a=√5) on a (D, k) tensor: U(±1/√k)
        self.W = nn.Parameter(torch.empty(n_heads, head_dim, rank).uniform_(-bound, bound, generator=generator))
        self.R = nn.Parameter(torch.empty(n_heads, head_dim, rank).uniform_(-bound, bound, generator=generator))
        self.B = nn.Parameter(torch.zeros(n_heads, head_dim, rank))
        self.s = nn.Parameter(torch.zeros(n_heads, head_dim))
        self.drop_identity = False

    @property
    def n_heads(self) -> int:
        return self.W.shape[0]

    @property
    def head_dim(self) -> int:
        return self.W.shape[1]

    @property
    def rank(self) -> int:
        return self.W.shape[2]

    def delta(self, a: torch.Tensor) -> torch.Tensor:
        """f(a) − a = tanh(W ⊙ a + B)(Rᵀ a) + s, for ``a: [..., H, D]``."""
        a = a.to(self.W.dtype)
        u = torch.einsum("...hd,hdk->...hk", a, self.R)  # Rᵀa: [..., H, k]
        gate = torch.tanh(self.W * a.unsqueeze(-1) + self.B)  # [..., H, D, k]
        return torch.einsum("...hdk,...hk->...hd", gate, u) + self.s

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        out = self.delta(a)
        if self.drop_identity:
            return out.to(a.dtype)
        return (a + out).to(a.dtype)
