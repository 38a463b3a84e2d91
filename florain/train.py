"""Fitting FLORAIN: Adam on the squared projection distance, best epoch per head by validation loss."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from florain.mapping import LowRankHeadMap
from florain.projection import hinge_loss
from florain.region import Regions


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings. Defaults follow the released FLORAIN sweep (lr 2e-4, batch 100, 1,000 epochs)."""

    rank: int = 32
    lr: float = 2e-4
    batch_size: int = 100
    epochs: int = 1000
    seed: int = 42
    compile: bool = False  # torch.compile the training step (≈2.5× faster on CPU; ~25 s to compile)


@dataclass
class TrainResult:
    """The fitted map (best validation epoch for each head) and its curves, per epoch and head."""

    mapping: LowRankHeadMap
    train_loss: list[list[float]] = field(default_factory=list)
    val_loss: list[list[float]] = field(default_factory=list)
    best_epoch: list[int] = field(default_factory=list)


def training_pairs(
    groups: torch.Tensor, regions: Regions
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of ``groups`` whose question has a region, and the region index of each row."""
    index = {int(q): i for i, q in enumerate(regions.questions)}
    rows = [i for i, q in enumerate(groups.tolist()) if q in index]
    owners = [index[int(groups[i])] for i in rows]
    return torch.tensor(rows, dtype=torch.long), torch.tensor(owners, dtype=torch.long)


def _loss(mapping: LowRankHeadMap, acts: torch.Tensor, centres: torch.Tensor, precision: torch.Tensor, rho: torch.Tensor) -> torch.Tensor:
    return hinge_loss(mapping(acts), centres, precision, rho)


def per_head_loss(mapping: LowRankHeadMap, acts: torch.Tensor, owner: torch.Tensor, regions: Regions) -> torch.Tensor:
    """Squared projection distance of f(a) per sample and head, ``[n, H]``."""
    return _loss(mapping, acts, regions.centres[owner], regions.precision, regions.rho[owner])


@torch.no_grad()
def _mean_loss(mapping: LowRankHeadMap, acts: torch.Tensor, owner: torch.Tensor, regions: Regions, chunk: int = 4096) -> torch.Tensor:
    total = torch.zeros(mapping.n_heads)
    for i in range(0, len(acts), chunk):
        total += per_head_loss(mapping, acts[i : i + chunk], owner[i : i + chunk], regions).sum(0)
    return total / max(len(acts), 1)


def fit_map(
    train_acts: torch.Tensor,
    train_owner: torch.Tensor,
    train_regions: Regions,
    val_acts: torch.Tensor,
    val_owner: torch.Tensor,
    val_regions: Regions,
    config: TrainConfig,
    progress: Callable[[int, float, float], None] | None = None,
) -> TrainResult:
    """Train one map for all heads. ``*_acts: [n, H, D]``; ``*_owner: [n]`` indexes the regions.

    The loss of a mini-batch is the sum over its samples (as in the released code); heads are
    independent (no parameter is shared), so one Adam over all heads equals one Adam per head.
    Each head keeps the parameters of its own best validation epoch (the training epoch if there
    is no validation data).
    """
    if len(train_acts) == 0:
        raise ValueError("no training samples: no question has ≥ 2 desirable and ≥ 1 undesirable answer")
    gen = torch.Generator().manual_seed(config.seed)
    n_heads, head_dim = train_acts.shape[1:]
    mapping = LowRankHeadMap(n_heads, head_dim, config.rank, generator=gen)
    opt = torch.optim.Adam(mapping.parameters(), lr=config.lr)
    best = torch.full((n_heads,), math.inf)
    best_state = copy.deepcopy(mapping.state_dict())
    result = TrainResult(mapping=mapping)
    n = len(train_acts)
    step_loss = torch.compile(_loss, dynamic=True) if config.compile else _loss
    for epoch in range(config.epochs):
        order = torch.randperm(n, generator=gen)
        epoch_total = torch.zeros(n_heads)
        for start in range(0, n, config.batch_size):
            idx = order[start : start + config.batch_size]
            own = train_owner[idx]
            loss = step_loss(mapping, train_acts[idx], train_regions.centres[own], train_regions.precision, train_regions.rho[own])
            opt.zero_grad(set_to_none=True)
            loss.sum().backward()
            opt.step()
            epoch_total += loss.detach().sum(0)
        train_loss = epoch_total / n
        val_loss = _mean_loss(mapping, val_acts, val_owner, val_regions) if len(val_acts) else train_loss
        if not torch.isfinite(train_loss).all():
            raise FloatingPointError(f"FLORAIN training diverged at epoch {epoch} (non-finite loss); lower the learning rate")
        result.train_loss.append(train_loss.tolist())
        result.val_loss.append(val_loss.tolist())
        improved = val_loss < best
        if improved.any():
            best = torch.where(improved, val_loss, best)
            state = mapping.state_dict()
            for name, value in state.items():
                best_state[name][improved] = value[improved]
        if progress is not None:
            progress(epoch, float(train_loss.mean()), float(val_loss.mean()))
    mapping.load_state_dict(best_state)
    result.best_epoch = [int(torch.tensor(result.val_loss)[:, h].argmin()) for h in range(n_heads)]
    return result
