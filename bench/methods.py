"""Built-in methods, registered with the intervention registry.

Each ``_fit_*`` turns a fold's data into an :class:`Intervention` using the pure implementations in
``florain/`` and ``baselines/``; defaults are defined there, next to their sources.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import numpy as np
import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from baselines.few_shot import DEFAULT_SHOTS, few_shot_prefix
from baselines.iti import DEFAULT_ALPHA, default_k, iti_shift, top_heads
from baselines.lofit import DEFAULT_BATCH as LOFIT_BATCH
from baselines.lofit import DEFAULT_EPOCHS as LOFIT_EPOCHS
from baselines.lofit import DEFAULT_K_FRACTION as LOFIT_K_FRACTION
from baselines.lofit import DEFAULT_L1 as LOFIT_L1
from baselines.lofit import DEFAULT_LR as LOFIT_LR
from baselines.lofit import HeadScaleBias, l1_penalty, select_heads
from baselines.shift import AdditiveShift, mean_difference
from bench.capture import capture, qa_text
from bench.data.truthfulqa import Fold, Question
from bench.interventions import Intervention, Method, register
from bench.models import LoadedModel
from bench.probes import PROBE_SCORES, head_probe_accuracies
from bench.scoring import Encoded, encode
from florain import FlorainConfig, LowRankHeadMap, fit_florain


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
    text_format: str = "qa"  # "qa": "Q: {question} A: {answer}"; "continuation": question + answer (a prompt's continuation)

    def qa_pairs(self) -> tuple[list[str], torch.Tensor, torch.Tensor]:
        """Capture texts of every loaded question's answers, labels (1 = correct) and question ids."""
        if self.text_format not in ("qa", "continuation"):
            raise ValueError(f"unknown text format {self.text_format!r}; valid: qa, continuation")
        texts, labels, groups = [], [], []
        for q in self.questions:
            for ans, lab in [(a, 1) for a in q.correct] + [(a, 0) for a in q.incorrect]:
                texts.append(qa_text(q.question, ans) if self.text_format == "qa" else q.question + ans)
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


#: Each method's fixed option defaults (model-dependent ones, such as ITI's K, are computed in its fit). The
#: registry holds them too, so a run that states a default equals one that leaves it unset.
ITI_DEFAULTS = {"iti_alpha": DEFAULT_ALPHA, "iti_rank": "accuracy", "seed": 42}
SHIFT_DEFAULTS = {"shift_scale": 1.0}
CAA_DEFAULTS = {"caa_multiplier": 1.0}
FEW_SHOT_DEFAULTS = {"shots": DEFAULT_SHOTS}
LOFIT_DEFAULTS = {"lofit_l1": LOFIT_L1, "lofit_lr": LOFIT_LR, "seed": 42}


def _opt(ctx: FitContext, name: str, default):
    value = ctx.options.get(name)
    return default if value is None else value


def _fit_iti(ctx: FitContext) -> Intervention:
    """Probes on every head of every layer (train split), top-K by validation accuracy, shift α σ θ̂ with θ and σ
    from the training fold (train + validation questions; never the test fold).

    Option ``iti_layer``: rank only that layer's heads (ITI restricted to one layer, for layer sweeps); K then
    defaults to ITI's share of that layer's heads (48/1,024, at least 1), so the probes still select heads.
    Option ``iti_rank``: rank by validation ``accuracy`` (ITI) or ``auroc`` (for class-imbalanced fitting data).
    """
    spec = ctx.lm.spec
    alpha = float(_opt(ctx, "iti_alpha", ITI_DEFAULTS["iti_alpha"]))
    rank_by = str(_opt(ctx, "iti_rank", ITI_DEFAULTS["iti_rank"]))
    if rank_by not in PROBE_SCORES:  # before the activation capture, not after it
        raise ValueError(f"unknown ITI head ranking {rank_by!r}; valid: {', '.join(PROBE_SCORES)}")
    only = ctx.options.get("iti_layer")
    if only is not None:
        spec.check_layer(int(only))
    layers = list(range(spec.n_layers)) if only is None else [int(only)]
    k = int(_opt(ctx, "iti_k", default_k(len(layers), spec.n_heads)))
    acts, labels, groups = ctx.activations(layers)
    tr, va = ctx.split(groups, "train"), ctx.split(groups, "val")
    seed = int(_opt(ctx, "seed", ITI_DEFAULTS["seed"]))
    accs = np.stack([head_probe_accuracies(acts[layer][tr], labels[tr], acts[layer][va], labels[va], seed, rank_by)
                     for layer in layers])
    chosen = [(layers[row], h) for row, h in top_heads(accs, k)]
    fold_rows = tr | va
    modules = {}
    for layer in sorted({layer for layer, _ in chosen}):
        heads = [h for lay, h in chosen if lay == layer]
        modules[layer] = AdditiveShift(iti_shift(acts[layer][fold_rows], labels[fold_rows], heads, alpha))
    return Intervention("iti", ctx.site, modules, {
        **_shape_config(acts[layers[0]], ctx), "alpha": alpha, "k": len(chosen), "heads_chosen": chosen,
        "layer_restriction": None if only is None else int(only), "probe_score": rank_by,
        f"probe_val_{rank_by}": [float(accs[layers.index(lay), h]) for lay, h in chosen]})


def _fit_mean_shift(ctx: FitContext) -> Intervention:
    """The probe-free control: add scale × (μ⁺ − μ⁻) (training split, all heads) at FLORAIN's site and layer."""
    scale = float(_opt(ctx, "shift_scale", SHIFT_DEFAULTS["shift_scale"]))
    acts, labels, groups = ctx.activations()
    tr = ctx.split(groups, "train")
    shift = scale * mean_difference(acts[ctx.layer][tr], labels[tr])
    return Intervention("mean-shift", ctx.site, {ctx.layer: AdditiveShift(shift)},
                        {**_shape_config(acts[ctx.layer], ctx), "scale": scale})


def _fit_caa(ctx: FitContext) -> Intervention:
    """Contrastive Activation Addition: multiplier × mean residual-stream difference (training fold) at one layer."""
    multiplier = float(_opt(ctx, "caa_multiplier", CAA_DEFAULTS["caa_multiplier"]))
    acts, labels, groups = ctx.activations(site="residual")
    rows = ctx.split(groups, "train") | ctx.split(groups, "val")
    shift = multiplier * mean_difference(acts[ctx.layer][rows], labels[rows])
    return Intervention("caa", "residual", {ctx.layer: AdditiveShift(shift)},
                        {**_shape_config(acts[ctx.layer], ctx), "multiplier": multiplier})


def _fit_few_shot(ctx: FitContext) -> Intervention:
    """Prepend N question/best-answer pairs from the fold's training questions (never test questions)."""
    shots = int(_opt(ctx, "shots", FEW_SHOT_DEFAULTS["shots"]))
    train = [ctx.questions[i] for i in ctx.fold.train]
    prefix = few_shot_prefix([(q.question, q.best_answer) for q in train], shots)
    return Intervention("few-shot", ctx.site, {}, {"shots": shots, "heads": None, "head_dim": None,
                                                   "example_questions": [q.index for q in train[:shots]]}, prefix)


def _lofit_batches(ctx: FitContext, encoded: list[Encoded], batch: int, gen: torch.Generator):
    """Right-padded (input_ids, attention_mask, labels) batches; labels are -100 except on the answer tokens."""
    tok = ctx.lm.tokenizer
    order = torch.randperm(len(encoded), generator=gen).tolist()
    for start in range(0, len(order), batch):
        chunk = [encoded[i] for i in order[start : start + batch]]
        t = max(len(e.ids) for e in chunk)
        ids = torch.full((len(chunk), t), tok.pad_token_id, dtype=torch.long)
        attn = torch.zeros(len(chunk), t, dtype=torch.long)
        labels = torch.full((len(chunk), t), -100, dtype=torch.long)
        for b, e in enumerate(chunk):
            ids[b, : len(e.ids)] = torch.tensor(e.ids)
            attn[b, : len(e.ids)] = 1
            labels[b, e.answer] = torch.tensor([e.ids[i] for i in e.answer])
        yield ids, attn, labels


def _lofit_train(ctx: FitContext, modules: dict, params: list, epochs: int, l1: float, lr: float, batch: int,
                 rows: list[Encoded], gen: torch.Generator, label: str) -> list[float]:
    from contextlib import ExitStack

    from bench.sites import hooked

    lm = ctx.lm
    device = next(lm.model.parameters()).device
    for m in modules.values():
        m.to(device)
    opt = torch.optim.Adam(params, lr=lr)
    losses = []
    n_batches = epochs * ((len(rows) + batch - 1) // batch)
    with Progress(TextColumn(f"[bold]LoFiT {label} fold {ctx.fold.fold}"), BarColumn(),
                  TextColumn("{task.completed}/{task.total} batches"), TextColumn("loss {task.fields[loss]:.4g}"),
                  TimeRemainingColumn(), transient=True) as bar:
        task = bar.add_task("lofit", total=n_batches, loss=float("nan"))
        for _ in range(epochs):
            for ids, attn, labels in _lofit_batches(ctx, rows, batch, gen):
                with ExitStack() as stack, torch.enable_grad():
                    for layer, m in modules.items():
                        stack.enter_context(hooked(lm.model, lm.spec, layer, "heads", m, "all"))
                    out = lm.model(input_ids=ids.to(device), attention_mask=attn.to(device), labels=labels.to(device))
                    loss = out.loss + (l1 * l1_penalty(modules) if l1 else 0.0)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                losses.append(float(out.loss.detach()))
                bar.update(task, advance=1, loss=losses[-1])
    return losses


def _fit_lofit(ctx: FitContext) -> Intervention:
    """LoFiT: stage 1 learns per-head scalings (L1) on every head and keeps the top K; stage 2 learns the bias
    offsets of those heads, with the LM loss on the training questions' correct answers (``Q: {q}\nA: {a}``)."""
    spec = ctx.lm.spec
    if ctx.site != "heads":
        raise ValueError("LoFiT edits attention-head outputs: use --site heads")
    k = int(_opt(ctx, "lofit_k", max(1, round(LOFIT_K_FRACTION * spec.n_layers * spec.n_heads))))
    l1 = float(_opt(ctx, "lofit_l1", LOFIT_DEFAULTS["lofit_l1"]))
    lr = float(_opt(ctx, "lofit_lr", LOFIT_DEFAULTS["lofit_lr"]))
    epochs1, epochs2 = LOFIT_EPOCHS
    seed = int(_opt(ctx, "seed", LOFIT_DEFAULTS["seed"]))
    gen = torch.Generator().manual_seed(seed)
    rows = [encode(ctx.lm, f"Q: {ctx.questions[i].question}\nA: {a}", len(f"Q: {ctx.questions[i].question}\nA: "))
            for i in ctx.fold.train for a in ctx.questions[i].correct]  # tokenised once, reused every epoch
    heads, dim = spec.site_shape("heads")
    stage1 = {layer: HeadScaleBias(heads, dim) for layer in range(spec.n_layers)}
    for m in stage1.values():
        m.v.requires_grad_(False)
    loss1 = _lofit_train(ctx, stage1, [m.A for m in stage1.values()], epochs1, l1, lr, LOFIT_BATCH, rows, gen,
                         "stage 1 (scalings, L1)")
    chosen = select_heads(stage1, k)
    stage2 = {}
    for layer in sorted({layer for layer, _ in chosen}):
        m = HeadScaleBias(heads, dim)
        m.head_mask.zero_()
        for lay, h in chosen:
            if lay == layer:
                m.head_mask[h] = 1
        m.A.requires_grad_(False)
        stage2[layer] = m
    loss2 = _lofit_train(ctx, stage2, [m.v for m in stage2.values()], epochs2, 0.0, lr, LOFIT_BATCH, rows, gen,
                         "stage 2 (offsets)")
    for m in stage2.values():
        m.cpu()
    iv = Intervention("lofit", "heads", stage2, {
        "heads": heads, "head_dim": dim, "model": ctx.lm.identity, "data_checksum": ctx.data_checksum,
        "fold": ctx.fold.fold, "k": len(chosen), "l1": l1, "lr": lr, "epochs": [epochs1, epochs2],
        "batch_size": LOFIT_BATCH, "heads_chosen": chosen, "n_train_answers": len(rows),
        "stage1_loss": [loss1[0], loss1[-1]], "stage2_loss": [loss2[0], loss2[-1]]})
    iv.position_policy = "all"
    return iv


def _build_lofit(config: dict, tensors: dict[str, torch.Tensor]) -> HeadScaleBias:
    return HeadScaleBias(*tensors["A"].shape)


register(Method("none", "no intervention (the unintervened model)", _fit_none, _build_none, needs_layer=False))
register(Method("florain", "FLORAIN: per-question ellipsoids + low-rank nonlinear map on all heads of one layer",
                _fit_florain, _build_florain,
                options=(*(f.name for f in fields(FlorainConfig)), "drop_identity"),
                defaults={**{f.name: f.default for f in fields(FlorainConfig)}, "drop_identity": False}))
register(Method("iti", "ITI: α σ θ̂ mass-mean shift on the top-K probe heads", _fit_iti, _build_shift,
                needs_layer=False, options=("iti_alpha", "iti_k", "iti_layer", "iti_rank", "seed"), defaults=ITI_DEFAULTS))
register(Method("mean-shift", "control: global μ⁺ − μ⁻ added at FLORAIN's site and layer", _fit_mean_shift,
                _build_shift, options=("shift_scale",), defaults=SHIFT_DEFAULTS))
register(Method("caa", "CAA: mean residual-stream difference added at one layer", _fit_caa, _build_shift,
                options=("caa_multiplier",), defaults=CAA_DEFAULTS))
register(Method("lofit", "LoFiT: learned per-head scaling (head selection) and bias offsets, LM loss",
                _fit_lofit, _build_lofit, needs_layer=False, options=("lofit_k", "lofit_l1", "lofit_lr", "seed"), defaults=LOFIT_DEFAULTS))
register(Method("few-shot", "few-shot prompting with training-fold questions", _fit_few_shot, _build_none,
                needs_layer=False, options=("shots",), defaults=FEW_SHOT_DEFAULTS))
