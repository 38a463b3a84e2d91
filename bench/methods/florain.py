"""FLORAIN (``florain/``) as a harness method: its options, its fit on one fold, its rebuild from a saved fit."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from bench.interventions import Intervention, method
from bench.methods.context import FitContext
from bench.options import option
from bench.progress import progress_bar
from florain import EXTRAPOLATIONS, PAPER_LAM, RELEASED_LAM_SCALE, FlorainConfig, LowRankHeadMap, fit_florain


@dataclass(frozen=True)
class FlorainOptions:
    """FLORAIN's options. Defaults are :class:`florain.FlorainConfig`'s, whose docstring gives each one's source
    (paper summary, released code or our choice)."""

    rank: int = option(FlorainConfig.rank, "rank k of the low-rank map", low=1, label="rank k")
    alpha: float = option(FlorainConfig.alpha, "α: weight of the question's own direction against the global one", low=0,
                          high=1, label="α (weight of the question direction)")
    extrapolation: str = option(FlorainConfig.extrapolation, "centre m_q: raw = μ_q⁺ + λ[α(μ_q⁺ − μ_q⁻) + (1 − α)(μ⁺ − μ⁻)] "
                                "(paper); unit = the same with unit-length differences (released code)",
                                choices=EXTRAPOLATIONS, label="centre extrapolation")
    lam: float | None = option(FlorainConfig.lam, f"λ; raw form: a multiple of the mean differences (none: {PAPER_LAM:g}, paper); "
                               "unit form: activation units (none: lam_scale × the mean head-activation norm)",
                               above=0, label="λ (raw: × mean differences; unit: activation units)")
    lam_scale: float | None = option(FlorainConfig.lam_scale, "unit form only: λ as a multiple of the mean head-activation "
                                     f"norm (none: {RELEASED_LAM_SCALE:.3g}, released code: see florain/__init__.py)", above=0,
                                     label="λ scale (unit form; × mean head-activation norm)")
    beta: float = option(FlorainConfig.beta, "β: covariance shrinkage toward its diagonal (1 = none)", low=0, high=1,
                         label="β (covariance shrinkage, 1 = none)")
    shrinking: float = option(FlorainConfig.shrinking, "ρ divisor (released code)", above=0, label="ρ divisor")
    lr: float = option(FlorainConfig.lr, "Adam learning rate", above=0, label="Adam learning rate")
    batch_size: int = option(FlorainConfig.batch_size, "training batch size (samples)", low=1, label="fit batch size (samples)")
    epochs: int = option(FlorainConfig.epochs, "training epochs (each head keeps its best validation epoch)", low=1,
                         label="training epochs")
    drop_identity: bool = option(False, "apply f(a) − a instead of f(a): reproduces the released code's inference "
                                 "bug", sweep=False)

    def __post_init__(self) -> None:
        FlorainConfig(**{k: v for k, v in asdict(self).items() if k != "drop_identity"})  # its combination checks


def _build_florain(config: dict, tensors: dict[str, torch.Tensor]) -> LowRankHeadMap:
    heads, dim, rank = tensors["W"].shape
    module = LowRankHeadMap(heads, dim, rank)
    module.drop_identity = bool(config.get("drop_identity", False))
    return module



@method("florain", "FLORAIN: per-question ellipsoids + low-rank nonlinear map on all heads of one layer",
        build=_build_florain, options=FlorainOptions,
        version=2)  # 2: the paper's raw extrapolation with λ = 5 (1: released unit form, λ = 8 norms)
def fit(ctx: FitContext, options: FlorainOptions) -> Intervention:
    """Ellipsoids from the fold's training questions, the map fitted on them, each head's best epoch chosen on
    the fold's validation questions (never its test questions)."""
    hyper = {k: v for k, v in asdict(options).items() if k != "drop_identity"}
    config = FlorainConfig(**hyper, seed=ctx.seed, compile=ctx.compile)
    acts_by_layer, labels, groups = ctx.activations()
    acts = acts_by_layer[ctx.layer]
    tr, va = ctx.split(groups, "train"), ctx.split(groups, "val")
    with progress_bar(f"FLORAIN fold {ctx.fold.fold}", config.epochs, " epochs") as advance:

        def progress(epoch: int, loss: float, val: float) -> None:
            advance(1, loss=loss, val=val)

        fitted = fit_florain(acts[tr], labels[tr], groups[tr], acts[va], labels[va], groups[va], config, progress)
    fitted.mapping.drop_identity = options.drop_identity
    heads, dim = acts.shape[1:]
    best = [fitted.train.val_loss[e][h] for h, e in enumerate(fitted.train.best_epoch)]
    return Intervention(
        "florain", ctx.site, {ctx.layer: fitted.mapping},
        {"heads": heads, "head_dim": dim, "hyperparameters": config.to_dict(), "lam_resolved": fitted.lam,
         "extrapolation": config.extrapolation,
         "drop_identity": fitted.mapping.drop_identity, "model": ctx.lm.identity, "data_checksum": ctx.data_checksum,
         "fold": ctx.fold.fold, "n_train_samples": fitted.n_train, "n_val_samples": fitted.n_val,
         "best_epoch": fitted.train.best_epoch, "best_val_loss": best,
         "final_train_loss": fitted.train.train_loss[-1], "covariance_ridge": fitted.regions.ridge,
         "inside_share": fitted.diagnostics, "fit_summary": _florain_summary(fitted, config.epochs)},
    )


def _florain_summary(fitted, epochs: int) -> str:
    """One log line: how far the map gets (shares of f(a) inside their ellipsoid) and where each head stopped."""
    def mean(xs: list[float]) -> float:
        return sum(xs) / len(xs) if xs else float("nan")

    d = fitted.diagnostics
    parts = [f"λ {fitted.lam:.4g}"]
    for name in ("train", "val"):
        if f"{name}_inside" in d:
            s = d[f"{name}_inside"]
            parts.append(f"{name} inside ellipsoid {mean(s['before']):.3f} → {mean(s['after']):.3f}")
    parts.append(f"best epochs {sorted(fitted.train.best_epoch)} of {epochs}")
    return "; ".join(parts)


