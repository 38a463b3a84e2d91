"""The unintervened model, as a method (the baseline row of every table)."""

from __future__ import annotations

import torch

from bench.interventions import method
from bench.methods.context import FitContext


def build_none(config: dict, tensors: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The module of a method that edits no activation (none, few-shot)."""
    return torch.nn.Identity()


@method("none", "no intervention (the unintervened model)", build=build_none, needs_layer=False)
def fit(ctx: FitContext, options: object) -> None:
    return None
