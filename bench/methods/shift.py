"""The probe-free control ``mean-shift``: the class-mean difference added at FLORAIN's site and layer."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from baselines.shift import AdditiveShift, mean_difference
from bench.data.truthfulqa import make_folds
from bench.interventions import Intervention, method
from bench.methods.context import FitContext, build_shift, shape_config
from bench.options import option
from bench.paths import repo_root
from bench.runs import RunFolder


class MatchNotFoundError(FileNotFoundError, ValueError):
    """The ``match`` folder holds no FLORAIN fit: a missing file, and a bad option value (refused with the run's
    other problems before anything loads)."""


@dataclass(frozen=True)
class MeanShiftOptions:
    """The control's options (our own: a scale of 1 is the plain class-mean difference)."""

    scale: float = option(1.0, "scale of μ⁺ − μ⁻", label="mean-shift scale (× μ⁺ − μ⁻)", legacy="shift_scale")
    match: str | None = option(None, "a FLORAIN run directory: each head's μ⁺ − μ⁻ is rescaled to the norm of that "
                               "run's mean edit on the same fold (matched strength; none: off)",
                               legacy="shift_match", sweep=False)

    def __post_init__(self) -> None:
        # one folder, one value: relative to the repository when inside it (as make reproduce-table1 writes it),
        # else absolute, so a run recorded with either spelling is the same run
        if self.match is not None:
            object.__setattr__(self, "match", canonical_path(self.match))
            fit = RunFolder(repo_root() / self.match).intervention(0)
            if not fit.is_dir():  # refused before anything loads, not when the first fold is fitted
                raise MatchNotFoundError(f"--method mean-shift option match: {self.match} holds no {fit.name}/; "
                                         "give the folder of a finished `bench run --method florain`")


@method("mean-shift", "control: global μ⁺ − μ⁻ added at FLORAIN's site and layer", build=build_shift,
        options=MeanShiftOptions, version=2)  # 2: fitted on train + validation questions (1: train only)
def fit_mean_shift(ctx: FitContext, options: MeanShiftOptions) -> Intervention:
    """The probe-free control: add scale × (μ⁺ − μ⁻) (all heads) at FLORAIN's site and layer, from the fold's
    training and validation questions (the questions FLORAIN, ITI and CAA fit on).

    Option ``match`` (a FLORAIN run directory of the same data and split): rescale each head's μ⁺ − μ⁻ to
    the norm of that run's mean edit ‖E[f(a) − a]‖ over the same fold's training/validation activations (same
    layer), then multiply by the scale, so that the control's constant shift is as large as FLORAIN's average
    displacement and the comparison asks what FLORAIN adds beyond a constant shift.
    """
    scale = options.scale
    acts, labels, groups = ctx.activations()
    rows = ctx.split(groups, "train") | ctx.split(groups, "val")
    shift = mean_difference(acts[ctx.layer][rows], labels[rows])
    info: dict = {"scale": scale}
    match = options.match
    if match:
        target = _florain_mean_edit_norm(repo_root() / match, ctx, acts[ctx.layer][rows])  # (absolute: itself)
        shift = shift / shift.norm(dim=-1, keepdim=True).clamp_min(1e-12) * target[:, None]
        info |= {"matched_to": str(match), "matched_norm": target.tolist()}
    shift = scale * shift
    return Intervention("mean-shift", ctx.site, {ctx.layer: AdditiveShift(shift)},
                        {**shape_config(acts[ctx.layer], ctx), **info})


def _florain_mean_edit_norm(run_dir: Path, ctx: FitContext, acts: torch.Tensor) -> torch.Tensor:
    """Per head, ‖E[f(a) − a]‖ of the FLORAIN fit in ``run_dir`` for this fold, over ``acts: [N, H, D]``."""
    folder = RunFolder(run_dir)
    path = folder.intervention(ctx.fold.fold)
    if not path.is_dir():
        raise FileNotFoundError(f"match: {path} does not exist; give a FLORAIN run directory that holds "
                                f"{path.name}/ (a finished `bench run --method florain`)")
    iv = Intervention.from_pretrained(path)
    if iv.method != "florain" or iv.site != ctx.site or iv.layers != [ctx.layer]:
        raise ValueError(f"match: {path} holds {iv.method} at site {iv.site}, layers {iv.layers}; this fit "
                         f"needs FLORAIN at site {ctx.site}, layer {ctx.layer} (pass the same --layer or site)")
    marker = folder.config
    rc = json.loads(marker.read_text())["config"] if marker.is_file() else None
    same_split = rc is not None and make_folds(len(ctx.questions), rc["folds"], rc["val_ratio"], rc["seed"])[
        ctx.fold.fold] == ctx.fold
    if not same_split or iv.config.get("data_checksum") != ctx.data_checksum:
        raise ValueError(f"match: {run_dir} was not fitted on this run's data and fold split (its "
                         "run_config.json must give the same --folds, --val-ratio, --seed and --limit): its fit "
                         "could have seen this fold's test questions")
    with torch.no_grad():
        a = acts.float()
        return (iv.modules[ctx.layer](a) - a).mean(0).norm(dim=-1)  # the module's real edit, drop_identity or not


def canonical_path(path: str) -> str:
    """``path`` relative to the repository root when it lies inside it, else absolute."""
    full = Path(path).expanduser().resolve()
    root = repo_root().resolve()
    return str(full.relative_to(root)) if full.is_relative_to(root) else str(full)
