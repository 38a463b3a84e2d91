"""Built-in methods, registered with the intervention registry: ``none`` and ``florain``."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, fields

import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from bench.capture import capture, qa_text
from bench.data.truthfulqa import Fold, Question
from bench.interventions import Intervention, Method, register
from bench.models import LoadedModel
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

    def activations(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(acts [N, H, D], labels [N], question ids [N])`` for all loaded questions (cached on disk)."""
        texts, labels, groups = self.qa_pairs()
        acts = capture(self.lm, texts, [self.layer], self.site, batch_size=self.capture_batch_size)[self.layer]
        return acts, labels, groups

    def split(self, groups: torch.Tensor, which: str) -> torch.Tensor:
        ids = torch.tensor([self.questions[i].index for i in getattr(self.fold, which)], dtype=groups.dtype)
        return torch.isin(groups, ids)


def _fit_none(ctx: FitContext) -> None:
    return None


def _fit_florain(ctx: FitContext) -> Intervention:
    names = {f.name for f in fields(FlorainConfig)}
    config = FlorainConfig(**{k: v for k, v in ctx.options.items() if k in names and v is not None})
    acts, labels, groups = ctx.activations()
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


register(Method("none", "no intervention (the unintervened model)", _fit_none, _build_none, needs_layer=False))
register(Method("florain", "FLORAIN: per-question ellipsoids + low-rank nonlinear map on all heads of one layer",
                _fit_florain, _build_florain))
