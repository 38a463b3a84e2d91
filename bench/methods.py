"""Built-in methods, registered with the intervention registry.

Each ``_fit_*`` turns a fold's data into an :class:`Intervention` using the pure implementations in
``florain/`` and ``baselines/``; defaults are defined there, next to their sources.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, fields

import numpy as np
import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from baselines.few_shot import DEFAULT_SHOTS, few_shot_prefix
from baselines.iti import DEFAULT_ALPHA, default_k, iti_shift, top_heads
from baselines.shift import AdditiveShift, mean_difference
from bench.capture import capture, qa_text
from bench.data.truthfulqa import Fold, Question
from bench.interventions import Intervention, Method, register
from bench.models import LoadedModel
from bench.probes import head_probe_accuracies
from florain import FlorainConfig, LowRankHeadMap, fit_florain

log = logging.getLogger(__name__)


@dataclass
class FitContext:
    """What a method may use to fit: the model, all loaded questions, one fold, the site and layer, options."""

    lm: LoadedModel
    questions: list[Question]
    fold: Fold
    layer: int
    site: str = "heads"
    options: dict = field(default_factory=dict)
    data_checksum: str = ""
    capture_batch_size: int = 32

    def qa_pairs(self) -> tuple[list[str], torch.Tensor, torch.Tensor]:
        """Capture texts of every loaded question's answers, labels (1 = correct) and question ids."""
        texts, labels, groups = [], [], []
        for q in self.questions:
            for ans, lab in [(a, 1) for a in q.correct] + [(a, 0) for a in q.incorrect]:
                texts.append(qa_text(q.question, ans))
                labels.append(lab)
                groups.append(q.index)
        return texts, torch.tensor(labels), torch.tensor(groups)

    def activations(self, layers: list[int] | None = None, site: str | None = None
                    ) -> tuple[dict[int, torch.Tensor], torch.Tensor, torch.Tensor]:
        """``({layer: acts [N, H, D]}, labels [N], question ids [N])`` for all loaded questions (cached on disk).

        Defaults: the context's layer and site.
        """
        texts, labels, groups = self.qa_pairs()
        acts = capture(self.lm, texts, layers or [self.layer], site or self.site, batch_size=self.capture_batch_size)
        return acts, labels, groups

    def split(self, groups: torch.Tensor, which: str) -> torch.Tensor:
        ids = torch.tensor([self.questions[i].index for i in getattr(self.fold, which)], dtype=groups.dtype)
        return torch.isin(groups, ids)


def _fit_none(ctx: FitContext) -> None:
    return None


def _fit_florain(ctx: FitContext) -> Intervention:
    names = {f.name for f in fields(FlorainConfig)}
    config = FlorainConfig(**{k: v for k, v in ctx.options.items() if k in names and v is not None})
    acts_by_layer, labels, groups = ctx.activations()
    acts = acts_by_layer[ctx.layer]
    tr, va = ctx.split(groups, "train"), ctx.split(groups, "val")
    with Progress(TextColumn("[bold]FLORAIN fold {task.fields[fold]}"), BarColumn(), TextColumn("{task.completed}/{task.total} epochs"),
                  TextColumn("loss {task.fields[loss]:.4g} val {task.fields[val]:.4g}"), TimeRemainingColumn(),
                  transient=True) as bar:
        task = bar.add_task("fit", total=config.epochs, fold=ctx.fold.fold, loss=float("nan"), val=float("nan"))

        def progress(epoch: int, loss: float, val: float) -> None:
            bar.update(task, completed=epoch + 1, loss=loss, val=val)

        fitted = fit_florain(acts[tr], labels[tr], groups[tr], acts[va], labels[va], groups[va], config, progress)
    fitted.mapping.drop_identity = bool(ctx.options.get("drop_identity", False))
    heads, dim = acts.shape[1:]
    best = [fitted.train.val_loss[e][h] for h, e in enumerate(fitted.train.best_epoch)]
    return Intervention(
        "florain", ctx.site, {ctx.layer: fitted.mapping},
        {"heads": heads, "head_dim": dim, "hyperparameters": config.to_dict(), "lam_resolved": fitted.lam,
         "drop_identity": fitted.mapping.drop_identity, "model": ctx.lm.identity, "data_checksum": ctx.data_checksum,
         "fold": ctx.fold.fold, "n_train_samples": fitted.n_train, "n_val_samples": fitted.n_val,
         "best_epoch": fitted.train.best_epoch, "best_val_loss": best,
         "final_train_loss": fitted.train.train_loss[-1], "covariance_ridge": fitted.regions.ridge},
    )


def _build_florain(config: dict, tensors: dict[str, torch.Tensor]) -> LowRankHeadMap:
    heads, dim, rank = tensors["W"].shape
    module = LowRankHeadMap(heads, dim, rank)
    module.drop_identity = bool(config.get("drop_identity", False))
    return module


def _build_none(config: dict, tensors: dict[str, torch.Tensor]) -> torch.nn.Module:
    return torch.nn.Identity()


def _build_shift(config: dict, tensors: dict[str, torch.Tensor]) -> AdditiveShift:
    return AdditiveShift(torch.zeros_like(tensors["shift"]))


def _shape_config(acts: torch.Tensor, ctx: FitContext) -> dict:
    return {"heads": acts.shape[1], "head_dim": acts.shape[2], "model": ctx.lm.identity,
            "data_checksum": ctx.data_checksum, "fold": ctx.fold.fold}


def _opt(ctx: FitContext, name: str, default):
    value = ctx.options.get(name)
    return default if value is None else value


def _fit_iti(ctx: FitContext) -> Intervention:
    """Probes on every head of every layer (train split), top-K by validation accuracy, shift α σ θ̂ with θ and σ
    from the training fold (train + validation questions; never the test fold)."""
    spec = ctx.lm.spec
    alpha = float(_opt(ctx, "iti_alpha", DEFAULT_ALPHA))
    k = int(_opt(ctx, "iti_k", default_k(spec.n_layers, spec.n_heads)))
    layers = list(range(spec.n_layers))
    acts, labels, groups = ctx.activations(layers)
    tr, va = ctx.split(groups, "train"), ctx.split(groups, "val")
    seed = int(_opt(ctx, "seed", 42))
    accs = np.stack([head_probe_accuracies(acts[layer][tr], labels[tr], acts[layer][va], labels[va], seed)
                     for layer in layers])
    chosen = top_heads(accs, k)
    fold_rows = tr | va
    modules = {}
    for layer in sorted({layer for layer, _ in chosen}):
        heads = [h for lay, h in chosen if lay == layer]
        modules[layer] = AdditiveShift(iti_shift(acts[layer][fold_rows], labels[fold_rows], heads, alpha))
    return Intervention("iti", ctx.site, modules, {
        **_shape_config(acts[0], ctx), "alpha": alpha, "k": len(chosen), "heads_chosen": chosen,
        "probe_val_accuracy": [float(accs[lay, h]) for lay, h in chosen]})


def _fit_mean_shift(ctx: FitContext) -> Intervention:
    """The probe-free control: add scale × (μ⁺ − μ⁻) (training split, all heads) at FLORAIN's site and layer."""
    scale = float(_opt(ctx, "shift_scale", 1.0))
    acts, labels, groups = ctx.activations()
    tr = ctx.split(groups, "train")
    shift = scale * mean_difference(acts[ctx.layer][tr], labels[tr])
    return Intervention("mean-shift", ctx.site, {ctx.layer: AdditiveShift(shift)},
                        {**_shape_config(acts[ctx.layer], ctx), "scale": scale})


def _fit_caa(ctx: FitContext) -> Intervention:
    """Contrastive Activation Addition: multiplier × mean residual-stream difference (training fold) at one layer."""
    multiplier = float(_opt(ctx, "caa_multiplier", 1.0))
    acts, labels, groups = ctx.activations(site="residual")
    rows = ctx.split(groups, "train") | ctx.split(groups, "val")
    shift = multiplier * mean_difference(acts[ctx.layer][rows], labels[rows])
    return Intervention("caa", "residual", {ctx.layer: AdditiveShift(shift)},
                        {**_shape_config(acts[ctx.layer], ctx), "multiplier": multiplier})


def _fit_few_shot(ctx: FitContext) -> Intervention:
    """Prepend N question/best-answer pairs from the fold's training questions (never test questions)."""
    shots = int(_opt(ctx, "shots", DEFAULT_SHOTS))
    train = [ctx.questions[i] for i in ctx.fold.train]
    prefix = few_shot_prefix([(q.question, q.best_answer) for q in train], shots)
    return Intervention("few-shot", ctx.site, {}, {"shots": shots, "heads": None, "head_dim": None,
                                                   "example_questions": [q.index for q in train[:shots]]}, prefix)


register(Method("none", "no intervention (the unintervened model)", _fit_none, _build_none, needs_layer=False))
register(Method("florain", "FLORAIN: per-question ellipsoids + low-rank nonlinear map on all heads of one layer",
                _fit_florain, _build_florain,
                options=(*(f.name for f in fields(FlorainConfig)), "drop_identity")))
register(Method("iti", "ITI: α σ θ̂ mass-mean shift on the top-K probe heads", _fit_iti, _build_shift,
                needs_layer=False, options=("iti_alpha", "iti_k", "seed")))
register(Method("mean-shift", "control: global μ⁺ − μ⁻ added at FLORAIN's site and layer", _fit_mean_shift,
                _build_shift, options=("shift_scale",)))
register(Method("caa", "CAA: mean residual-stream difference added at one layer", _fit_caa, _build_shift,
                options=("caa_multiplier",)))
register(Method("few-shot", "few-shot prompting with training-fold questions", _fit_few_shot, _build_none,
                needs_layer=False, options=("shots",)))
