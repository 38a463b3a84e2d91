"""FLORAIN: probe-free low-rank activation intervention (Jiang, Nguyen, So, Nguyen, NAACL 2025).

Pure torch: tensors in, tensors out. The harness (``bench``) owns models, files and the CLI.

Typical use::

    fitted = fit_florain(train_acts, train_labels, train_groups,
                         val_acts, val_labels, val_groups, FlorainConfig())
    new_acts = fitted.mapping(acts)        # acts: [..., heads, head_dim]
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from florain.mapping import LowRankHeadMap
from florain.projection import hinge_loss, mahalanobis, mahalanobis_sq, project, projection_distance
from florain.region import EXTRAPOLATIONS, Regions, build_regions, pooled_covariance, shrink
from florain.train import TrainConfig, TrainResult, fit_map, training_pairs

__all__ = [
    "EXTRAPOLATIONS",
    "PAPER_LAM",
    "RELEASED_LAM_SCALE",
    "FlorainConfig",
    "FittedFlorain",
    "LowRankHeadMap",
    "Regions",
    "TrainConfig",
    "build_regions",
    "fit_florain",
    "hinge_loss",
    "inside_shares",
    "mahalanobis",
    "project",
    "projection_distance",
    "resolve_lambda",
]

#: λ of the paper's (``raw``) form: the paper summary's "α = 0.2, λ = 5 works well across models". The shift is
#: λ times a mix of class-mean differences, so it is scale-free and one value can transfer across models.
PAPER_LAM = 5.0
#: λ of the released (``unit``) form, relative to the activation scale: the released sweep used λ = 30 on
#: Llama-7B, whose head chunks have a mean norm of about 1.8 (spec §3.2), i.e. λ ≈ 16.7 mean head norms. Taken
#: from the released code, not tuned on our data (an earlier default of 8 was chosen on TruthfulQA questions
#: that are another fold's test questions, so it was dropped).
RELEASED_LAM_SCALE = 30.0 / 1.8


@dataclass(frozen=True)
class FlorainConfig:
    """Hyper-parameters of FLORAIN; each default with its source.

    * ``extrapolation`` = ``"raw"``: the centre m_q = μ_q⁺ + λ[α(μ_q⁺ − μ_q⁻) + (1 − α)(μ⁺ − μ⁻)] as the paper
      summary states it; ``"unit"`` normalises both differences to unit length (the released code).
    * ``alpha`` α = 0.2: the paper summary (and the released sweep).
    * ``lam`` λ: ``None`` takes the form's default — ``raw``: :data:`PAPER_LAM` = 5 (paper summary); ``unit``:
      ``lam_scale × mean per-head activation norm`` of the training data (λ in activation units).
    * ``lam_scale``: only for ``unit`` (``None``: :data:`RELEASED_LAM_SCALE`, the released λ = 30 over Llama-7B's
      mean head norm 1.8).
    * ``rank`` k = 32: the released sweep (the paper summary gives no k).
    * ``beta`` β = 1: no shrinkage of Σ toward its diagonal. The paper summary defines the shrinkage but gives no
      value; the released code has none (β = 1).
    * ``shrinking`` = 1: ρ divisor (released code).
    * ``lr`` 2e-4, ``batch_size`` 100, ``epochs`` 1,000, Adam: released code. The paper summary says
      "preconditioned gradient descent"; Adam is a diagonally preconditioned method, the released code's choice.
    """

    rank: int = 32
    alpha: float = 0.2
    extrapolation: str = "raw"
    lam: float | None = None
    lam_scale: float | None = None
    beta: float = 1.0
    shrinking: float = 1.0
    lr: float = 2e-4
    batch_size: int = 100
    epochs: int = 1000
    seed: int = 42
    compile: bool = False

    def __post_init__(self) -> None:
        if self.extrapolation not in EXTRAPOLATIONS:
            raise ValueError(f"unknown extrapolation {self.extrapolation!r}; valid: {', '.join(EXTRAPOLATIONS)}")
        if self.lam_scale is not None and self.extrapolation != "unit":
            raise ValueError("lam_scale (λ as a multiple of the mean head-activation norm) belongs to the released "
                             "form: pass extrapolation='unit' (-O extrapolation=unit), or set λ of the paper's raw "
                             f"form directly with lam (-O lam=...; default {PAPER_LAM:g})")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class FittedFlorain:
    """A trained FLORAIN map plus what it was trained against."""

    mapping: LowRankHeadMap
    lam: float
    train: TrainResult
    regions: Regions
    n_train: int
    n_val: int
    val_regions: Regions | None = None  # the regions each head's best epoch was chosen on (None: no validation)
    diagnostics: dict = field(default_factory=dict)  # how far the map gets: see :func:`inside_shares`


def resolve_lambda(acts: torch.Tensor, config: FlorainConfig) -> float:
    """λ as :func:`build_regions` uses it: ``config.lam`` if set; else 5 (``raw``) or
    ``lam_scale × mean ||a_h||`` over ``acts: [N, H, D]`` (``unit``)."""
    if config.lam is not None:
        return float(config.lam)
    if config.extrapolation == "raw":
        return PAPER_LAM
    scale = RELEASED_LAM_SCALE if config.lam_scale is None else config.lam_scale
    return float(scale * acts.float().norm(dim=-1).mean())


@torch.no_grad()
def inside_shares(mapping: LowRankHeadMap, acts: torch.Tensor, owner: torch.Tensor, regions: Regions) -> dict:
    """Per head, the share of samples inside their question's ellipsoid before (a) and after the map (f(a)).

    ``acts: [n, H, D]``, ``owner: [n]`` region indices. Returns ``{"before": [H], "after": [H]}`` (lists).
    """
    if len(acts) == 0:
        return {"before": [], "after": []}
    centres, rho = regions.centres[owner], regions.rho[owner]

    def share(x: torch.Tensor) -> list[float]:
        d2 = mahalanobis_sq(x.double(), centres.double(), regions.precision.double())
        return (d2 <= rho.double() * (1 + 1e-6)).double().mean(0).tolist()

    return {"before": share(acts), "after": share(mapping(acts))}


def fit_florain(
    train_acts: torch.Tensor,
    train_labels: torch.Tensor,
    train_groups: torch.Tensor,
    val_acts: torch.Tensor,
    val_labels: torch.Tensor,
    val_groups: torch.Tensor,
    config: FlorainConfig,
    progress: Callable[[int, float, float], None] | None = None,
) -> FittedFlorain:
    """Build the regions from the training fold (validation regions reuse its Σ and μ⁺ − μ⁻) and fit the map.

    ``*_acts: [N, H, D]`` activations, ``*_labels: [N]`` (1 = desirable), ``*_groups: [N]`` question ids.
    """
    lam = resolve_lambda(train_acts, config)
    train_acts = train_acts.float()
    # The training fold's Σ (float64) and μ⁺ − μ⁻ shape both the training and the validation regions, so both
    # invert the same matrix and the best epoch is chosen in the geometry the map is trained in.
    covariance = shrink(pooled_covariance(train_acts, train_labels, train_groups), config.beta)
    pos = train_labels.bool()
    global_dir = train_acts[pos].double().mean(0) - train_acts[~pos].double().mean(0)
    train_regions = build_regions(
        train_acts, train_labels, train_groups, alpha=config.alpha, lam=lam, shrinking=config.shrinking,
        covariance=covariance, global_direction=global_dir, extrapolation=config.extrapolation,
    )
    rows, owner = training_pairs(train_groups, train_regions)
    if len(val_acts):
        val_regions = build_regions(
            val_acts.float(), val_labels, val_groups, alpha=config.alpha, lam=lam, shrinking=config.shrinking,
            covariance=covariance, global_direction=global_dir, extrapolation=config.extrapolation,
        )
        vrows, vowner = training_pairs(val_groups, val_regions)
    else:
        val_regions, vrows, vowner = None, torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long)
    tc = TrainConfig(rank=config.rank, lr=config.lr, batch_size=config.batch_size, epochs=config.epochs, seed=config.seed, compile=config.compile)
    result = fit_map(
        train_acts[rows], owner, train_regions, val_acts.float()[vrows], vowner, val_regions or train_regions, tc,
        progress=progress,
    )
    diagnostics = {"train_inside": inside_shares(result.mapping, train_acts[rows], owner, train_regions)}
    if val_regions is not None:
        diagnostics["val_inside"] = inside_shares(result.mapping, val_acts.float()[vrows], vowner, val_regions)
    return FittedFlorain(
        mapping=result.mapping, lam=lam, train=result, regions=train_regions, n_train=len(rows), n_val=len(vrows),
        val_regions=val_regions, diagnostics=diagnostics,
    )
