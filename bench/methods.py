"""Built-in methods, registered with the intervention registry.

Each ``_fit_*`` turns a fold's data into an :class:`Intervention` using the pure implementations in
``florain/`` and ``baselines/``; defaults are defined there, next to their sources.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from baselines.caa import DEFAULT_MULTIPLIER as CAA_MULTIPLIER
from baselines.caa import DEFAULT_SEED as CAA_SEED
from baselines.caa import ABPair, ab_pairs, mean_pair_difference, pair_answers
from baselines.few_shot import DEFAULT_SHOTS, few_shot_prefix
from baselines.iti import DEFAULT_ALPHA, default_k, iti_shift, top_heads
from baselines.lofit import DEFAULT_BATCH as LOFIT_BATCH
from baselines.lofit import DEFAULT_EPOCHS as LOFIT_EPOCHS
from baselines.lofit import DEFAULT_K_FRACTION as LOFIT_K_FRACTION
from baselines.lofit import DEFAULT_L1 as LOFIT_L1
from baselines.lofit import DEFAULT_LR as LOFIT_LR
from baselines.lofit import (
    DPO_BATCH,
    DPO_BETA,
    DPO_EPOCHS,
    DPO_INIT_STD,
    DPO_K_FRACTION,
    DPO_L1,
    DPO_LR,
    DPO_MAX_GRAD_NORM,
    DPO_RELEASED_EPOCHS,
    DPO_STAGE1_SAVED_FRACTION,
    HeadScaleBias,
    dpo_loss,
    init_normal_,
    l1_penalty,
    select_heads,
    sequence_logprobs,
)
from baselines.shift import AdditiveShift, mean_difference
from bench.capture import cache_key, capture, qa_end_q_text, qa_text
from bench.data.truthfulqa import Fold, Question, make_folds
from bench.interventions import Intervention, Method, register
from bench.models import LoadedModel
from bench.paths import activation_cache_dir
from bench.probes import PROBE_SCORES, head_probe_accuracies
from bench.runs import config_hash
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

    def probe_scores(self, layers: list[int], seed: int = 42, score: str = "accuracy") -> np.ndarray:
        """``[len(layers), heads]`` validation scores of one logistic probe per head, trained on the fold's
        training questions and scored on its validation questions (never its test questions).

        Cached per layer on disk beside the activations, keyed by the capture (model, dtype, site, texts), the
        labels, the split, the seed and the score, so ITI's head ranking and the layer rule share one fit."""
        acts, labels, groups = self.activations(layers)
        tr, va = self.split(groups, "train"), self.split(groups, "val")
        texts = self.qa_pairs()[0]
        root = activation_cache_dir() / "probes"
        out = []
        for layer in layers:
            key = config_hash({"capture": cache_key(self.lm.identity, str(self.lm.model.dtype), self.site, layer, texts),
                               "labels": labels.tolist(), "train": tr.tolist(), "val": va.tolist(), "seed": seed,
                               "score": score})
            path = root / f"{key}.npy"
            if path.is_file():
                out.append(np.load(path))
                continue
            scores = head_probe_accuracies(acts[layer][tr], labels[tr], acts[layer][va], labels[va], seed, score)
            root.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # one per process: concurrent runs
            with tmp.open("wb") as fh:
                np.save(fh, scores)
            tmp.replace(path)
            out.append(scores)
        return np.stack(out)

    def layer_probe_scores(self, seed: int = 42) -> np.ndarray:
        """``[layers, heads]`` probe accuracies of every layer (:meth:`probe_scores`): the released layer rule's input."""
        return self.probe_scores(list(range(self.lm.spec.n_layers)), seed)


def probe_layer(scores: np.ndarray) -> int:
    """The released FLORAIN code's layer rule: the layer whose heads' probes reach the best mean accuracy."""
    return int(np.argmax(scores.mean(1)))


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
ITI_DEFAULTS = {"iti_alpha": DEFAULT_ALPHA, "iti_rank": "accuracy", "iti_sigma_bank": "gen_end_q", "seed": 42}
#: Where ITI's σ comes from: ``qa`` = the fold's "Q: {q} A: {a}" texts (those of θ); ``gen_end_q`` = ITI's own
#: bank, "Q: {q} A: {a} Q: {another question}", built from the fold's training and validation questions only.
ITI_SIGMA_BANKS = ("qa", "gen_end_q")
SHIFT_DEFAULTS = {"shift_scale": 1.0}
CAA_DEFAULTS = {"caa_multiplier": CAA_MULTIPLIER, "caa_layer": "auto", "seed": CAA_SEED}
MEAN_DIFF_DEFAULTS = {"mean_diff_multiplier": 1.0}
FEW_SHOT_DEFAULTS = {"shots": DEFAULT_SHOTS}
LOFIT_DEFAULTS = {"lofit_l1": LOFIT_L1, "lofit_lr": LOFIT_LR, "seed": 42}  # lofit-sft
#: lofit (DPO): no ``lofit_lr``/``lofit_epochs`` here, since their defaults differ per stage (a given value sets both).
LOFIT_DPO_DEFAULTS = {"lofit_l1": DPO_L1, "lofit_beta": DPO_BETA, "seed": 42}
LOFIT_OPTIONS = ("lofit_k", "lofit_l1", "lofit_lr", "lofit_epochs", "seed")


def _opt(ctx: FitContext, name: str, default):
    value = ctx.options.get(name)
    return default if value is None else value


def gen_end_q_texts(questions: list[Question], rows: list[int], seed: int) -> list[str]:
    """ITI's σ-bank texts restricted to ``rows`` (positions in ``questions``): per question one other question
    drawn uniformly from ``rows`` (seeded; as in ITI it may be the question itself), then
    ``"Q: {q} A: {a} Q: {drawn}"`` for each of its correct and incorrect answers."""
    rng = np.random.default_rng(seed)
    texts = []
    for i in rows:
        q, drawn = questions[i], questions[rows[int(rng.integers(len(rows)))]].question
        texts += [qa_end_q_text(q.question, a, drawn) for a in (*q.correct, *q.incorrect)]
    return texts


def _iti_sigma_bank(ctx: FitContext, layers: list[int], seed: int) -> dict[int, torch.Tensor]:
    """Activations for ITI's σ, like its ``tqa_gen_end_q`` features (captured at the last token of
    "Q: {q} A: {a} Q: {another question}", every correct and incorrect answer, no labels used) but built from the
    fold's training and validation questions only. ITI's own bank spans all 817 questions, so under
    cross-validation it reads the test questions and their answers (not their labels); this one never does."""
    rows = sorted((*ctx.fold.train, *ctx.fold.val))
    texts = gen_end_q_texts(ctx.questions, rows, seed)
    return capture(ctx.lm, texts, layers, ctx.site, batch_size=ctx.capture_batch_size)


def _fit_iti(ctx: FitContext) -> Intervention:
    """Probes on every head of every layer (train split), top-K by validation accuracy, shift α σ θ̂ with θ and σ
    from the training fold (train + validation questions; never the test fold).

    Option ``iti_layer``: rank only that layer's heads (ITI restricted to one layer, for layer sweeps); K then
    defaults to ITI's share of that layer's heads (48/1,024, at least 1), so the probes still select heads.
    Option ``iti_rank``: rank by validation ``accuracy`` (ITI) or ``auroc`` (for class-imbalanced fitting data).
    Option ``iti_sigma_bank``: where σ comes from, ``gen_end_q`` (default; ITI's bank restricted to the fold, see
    :func:`_iti_sigma_bank`) or ``qa`` (the "Q: {q} A: {a}" activations θ comes from). Fitting texts that are not
    TruthfulQA answers (toxicity's continuations) have no such bank: their default is ``qa``.
    """
    spec = ctx.lm.spec
    alpha = float(_opt(ctx, "iti_alpha", ITI_DEFAULTS["iti_alpha"]))
    rank_by = str(_opt(ctx, "iti_rank", ITI_DEFAULTS["iti_rank"]))
    if rank_by not in PROBE_SCORES:  # before the activation capture, not after it
        raise ValueError(f"unknown ITI head ranking {rank_by!r}; valid: {', '.join(PROBE_SCORES)}")
    bank = str(_opt(ctx, "iti_sigma_bank", ITI_DEFAULTS["iti_sigma_bank"] if ctx.text_format == "qa" else "qa"))
    if bank not in ITI_SIGMA_BANKS or (bank == "gen_end_q" and ctx.text_format != "qa"):
        raise ValueError(f"unknown ITI σ bank {bank!r} for {ctx.text_format} fitting texts; valid: "
                         + ", ".join(ITI_SIGMA_BANKS if ctx.text_format == "qa" else ("qa",)))
    only = ctx.options.get("iti_layer")
    if only is not None:
        spec.check_layer(int(only))
    layers = list(range(spec.n_layers)) if only is None else [int(only)]
    k = int(_opt(ctx, "iti_k", default_k(len(layers), spec.n_heads)))
    acts, labels, groups = ctx.activations(layers)
    tr, va = ctx.split(groups, "train"), ctx.split(groups, "val")
    seed = int(_opt(ctx, "seed", ITI_DEFAULTS["seed"]))
    accs = ctx.probe_scores(layers, seed, rank_by)
    chosen = [(layers[row], h) for row, h in top_heads(accs, k)]
    fold_rows = tr | va
    modules = {}
    chosen_layers = sorted({layer for layer, _ in chosen})
    sigma = _iti_sigma_bank(ctx, chosen_layers, seed) if bank == "gen_end_q" else None
    for layer in chosen_layers:
        heads = [h for lay, h in chosen if lay == layer]
        modules[layer] = AdditiveShift(iti_shift(acts[layer][fold_rows], labels[fold_rows], heads, alpha,
                                                 None if sigma is None else sigma[layer]))
    return Intervention("iti", ctx.site, modules, {
        **_shape_config(acts[layers[0]], ctx), "alpha": alpha, "k": len(chosen), "heads_chosen": chosen,
        "sigma_bank": bank, "n_sigma_texts": int(fold_rows.sum()) if sigma is None else len(next(iter(sigma.values()))),
        "layer_restriction": None if only is None else int(only), "probe_score": rank_by,
        f"probe_val_{rank_by}": [float(accs[layers.index(lay), h]) for lay, h in chosen]})


def _fit_mean_shift(ctx: FitContext) -> Intervention:
    """The probe-free control: add scale × (μ⁺ − μ⁻) (all heads) at FLORAIN's site and layer, from the fold's
    training and validation questions (the questions FLORAIN, ITI and CAA fit on).

    Option ``shift_match`` (a FLORAIN run directory of the same data and split): rescale each head's μ⁺ − μ⁻ to
    the norm of that run's mean edit ‖E[f(a) − a]‖ over the same fold's training/validation activations (same
    layer), then multiply by the scale, so that the control's constant shift is as large as FLORAIN's average
    displacement and the comparison asks what FLORAIN adds beyond a constant shift.
    """
    scale = float(_opt(ctx, "shift_scale", SHIFT_DEFAULTS["shift_scale"]))
    acts, labels, groups = ctx.activations()
    rows = ctx.split(groups, "train") | ctx.split(groups, "val")
    shift = mean_difference(acts[ctx.layer][rows], labels[rows])
    info: dict = {"scale": scale}
    match = ctx.options.get("shift_match")
    if match:
        target = _florain_mean_edit_norm(Path(match), ctx, acts[ctx.layer][rows])
        shift = shift / shift.norm(dim=-1, keepdim=True).clamp_min(1e-12) * target[:, None]
        info |= {"matched_to": str(match), "matched_norm": target.tolist()}
    shift = scale * shift
    return Intervention("mean-shift", ctx.site, {ctx.layer: AdditiveShift(shift)},
                        {**_shape_config(acts[ctx.layer], ctx), **info})


def _florain_mean_edit_norm(run_dir: Path, ctx: FitContext, acts: torch.Tensor) -> torch.Tensor:
    """Per head, ‖E[f(a) − a]‖ of the FLORAIN fit in ``run_dir`` for this fold, over ``acts: [N, H, D]``."""
    path = run_dir / f"intervention_fold{ctx.fold.fold}"
    if not path.is_dir():
        raise FileNotFoundError(f"shift_match: {path} does not exist; give a FLORAIN run directory that holds "
                                f"intervention_fold{ctx.fold.fold}/ (a finished `bench run --method florain`)")
    iv = Intervention.from_pretrained(path)
    if iv.method != "florain" or iv.site != ctx.site or iv.layers != [ctx.layer]:
        raise ValueError(f"shift_match: {path} holds {iv.method} at site {iv.site}, layers {iv.layers}; this fit "
                         f"needs FLORAIN at site {ctx.site}, layer {ctx.layer} (pass the same --layer or site)")
    marker = run_dir / "run_config.json"
    rc = json.loads(marker.read_text())["config"] if marker.is_file() else None
    same_split = rc is not None and make_folds(len(ctx.questions), rc["folds"], rc["val_ratio"], rc["seed"])[
        ctx.fold.fold] == ctx.fold
    if not same_split or iv.config.get("data_checksum") != ctx.data_checksum:
        raise ValueError(f"shift_match: {run_dir} was not fitted on this run's data and fold split (its "
                         "run_config.json must give the same --folds, --val-ratio, --seed and --limit): its fit "
                         "could have seen this fold's test questions")
    with torch.no_grad():
        a = acts.float()
        return (iv.modules[ctx.layer](a) - a).mean(0).norm(dim=-1)  # the module's real edit, drop_identity or not


def _fit_mean_diff_resid(ctx: FitContext) -> Intervention:
    """A pooled CAA-like variant: multiplier × (mean residual stream of the desirable free-text answers − that of
    the undesirable ones), last token, training fold (train + validation questions), at the run's one layer."""
    multiplier = float(_opt(ctx, "mean_diff_multiplier", MEAN_DIFF_DEFAULTS["mean_diff_multiplier"]))
    acts, labels, groups = ctx.activations(site="residual")
    rows = ctx.split(groups, "train") | ctx.split(groups, "val")
    shift = multiplier * mean_difference(acts[ctx.layer][rows], labels[rows])
    return Intervention("mean-diff-resid", "residual", {ctx.layer: AdditiveShift(shift)},
                        {**_shape_config(acts[ctx.layer], ctx), "multiplier": multiplier})


def _caa_items(ctx: FitContext, which: str, every_answer: bool, seed: int) -> list[tuple[int, str, str, str]]:
    """``(question id, question, desirable, undesirable)`` from the fold's ``which`` ("train"/"val") questions only.

    ``every_answer`` (the vector's pairs): every correct answer, paired by :func:`baselines.caa.pair_answers` (correct
    ``j`` with incorrect ``j mod n_incorrect``). Otherwise (the layer sweep): one item per question, its best answer
    (else its first correct one) against one seeded-random incorrect answer, as CAA's TruthfulQA A/B set.
    Questions without both kinds of answer (possible in toxicity groups) are skipped."""
    rng = np.random.RandomState(seed)
    items = []
    for i in getattr(ctx.fold, which):
        q = ctx.questions[i]
        if not q.correct or not q.incorrect:
            continue
        if every_answer:
            items += [(q.index, q.question, good, bad) for good, bad in pair_answers(q.correct, q.incorrect)]
        else:
            items.append((q.index, q.question, q.best_answer or q.correct[0],
                          q.incorrect[rng.randint(len(q.incorrect))]))
    return items


def _ab_encode(lm: LoadedModel, pairs: list[ABPair]) -> list[tuple[list[int], int, int]]:
    """``(prompt ids, desirable letter id, undesirable letter id)`` per pair. Checks that a pair's two texts differ
    only in their last token, the letter: where the capture reads and the sweep scores."""
    pos = lm.tokenizer([p.positive for p in pairs])["input_ids"]
    neg = lm.tokenizer([p.negative for p in pairs])["input_ids"]
    out = []
    for p, a, b in zip(pairs, pos, neg):
        if len(a) != len(b) or a[:-1] != b[:-1] or a[-1] == b[-1]:
            raise ValueError(f"CAA: the tokenizer does not give the answer letter a last token of its own in "
                             f"{p.positive[-30:]!r} / {p.negative[-30:]!r}")
        out.append((list(a[:-1]), int(a[-1]), int(b[-1])))
    return out


@torch.no_grad()
def _ab_scores(lm: LoadedModel, encoded: list[tuple[list[int], int, int]], vectors: dict[int, torch.Tensor],
               batch_size: int) -> tuple[float, dict[int, float]]:
    """Mean over A/B prompts of p(desirable letter) / (p(A) + p(B)) at the letter position: unsteered, and with each
    layer's vector added to the residual stream after that layer at the prompt's last token ("(": CAA adds after
    the instruction). The prompt before that token is run once per batch; only its last token is rerun per layer
    (the edit at the last position leaves every earlier position unchanged)."""
    import copy
    from contextlib import nullcontext

    from bench.decoding import cache_kwarg as _cache_kwarg
    from bench.sites import hooked

    device, cache_kwarg = next(lm.model.parameters()).device, _cache_kwarg(lm.model)
    totals = dict.fromkeys([None, *vectors], 0.0)
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start : start + batch_size]
        t = max(len(e[0]) for e in chunk) - 1
        ids = torch.full((len(chunk), t), lm.tokenizer.pad_token_id, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for r, (row, _, _) in enumerate(chunk):  # left-padded prompts without their last token
            ids[r, t - len(row) + 1 :] = torch.tensor(row[:-1], dtype=torch.long)
            attn[r, t - len(row) + 1 :] = 1
        pos = (attn.cumsum(1) - 1).clamp(min=0)
        out = lm.model(input_ids=ids.to(device), attention_mask=attn.to(device), position_ids=pos.to(device),
                       use_cache=True, logits_to_keep=1)
        cache = getattr(out, "cache", None) or out.past_key_values
        step = dict(input_ids=torch.tensor([[e[0][-1]] for e in chunk], device=device),
                    attention_mask=torch.cat([attn, torch.ones(len(chunk), 1, dtype=torch.long)], 1).to(device),
                    position_ids=attn.sum(1, keepdim=True).to(device), use_cache=True)
        rows = torch.arange(len(chunk))
        for layer in totals:
            edit = hooked(lm.model, lm.spec, layer, "residual", AdditiveShift(vectors[layer]), "last") \
                if layer is not None else nullcontext()
            with edit:
                logits = lm.model(**step, **{cache_kwarg: copy.deepcopy(cache)}).logits[:, -1]
            probs = logits.float().softmax(-1).cpu()
            good = probs[rows, torch.tensor([e[1] for e in chunk])]
            bad = probs[rows, torch.tensor([e[2] for e in chunk])]
            totals[layer] += float((good / (good + bad)).sum())
    base = totals.pop(None) / len(encoded)
    return base, {layer: v / len(encoded) for layer, v in totals.items()}


def _caa_layers(ctx: FitContext) -> tuple[list[int], bool]:
    """The layers to build vectors at and whether CAA chooses among them (``caa_layer``: an index or "auto")."""
    choice = _opt(ctx, "caa_layer", CAA_DEFAULTS["caa_layer"])
    if str(choice) == "auto":
        return list(range(ctx.lm.spec.n_layers)), True
    try:
        layer = int(choice)
    except (TypeError, ValueError):
        raise ValueError(f"caa_layer must be a layer index or 'auto', got {choice!r}") from None
    ctx.lm.spec.check_layer(layer)
    return [layer], False


def _caa_sweep(ctx: FitContext, vectors: dict[int, torch.Tensor], seed: int) -> dict:
    """CAA's layer sweep on the fold's validation questions: each layer's vector at multiplier 1, scored by the
    mean normalised probability of the correct letter; the best layer (ties: the lowest)."""
    val = ab_pairs(_caa_items(ctx, "val", False, seed), seed)
    if not val:
        raise ValueError("caa_layer=auto chooses CAA's layer on the fold's validation questions and this fold has "
                         "none: use a validation share > 0 or set caa_layer")
    layers = sorted(vectors)
    base, by_layer = _ab_scores(ctx.lm, _ab_encode(ctx.lm, val), vectors, ctx.capture_batch_size)
    scores = [by_layer[layer] for layer in layers]
    return {"layer": layers[int(np.argmax(scores))], "layers_swept": layers, "val_scores": scores,
            "val_score_unsteered": base, "n_val_prompts": len(val),
            "val_questions": sorted({p.group for p in val})}


def _fit_caa(ctx: FitContext) -> Intervention:
    """CAA (``baselines/caa.py``): the mean over A/B pairs of the training questions of the residual-stream
    difference (desirable − undesirable letter) at the letter token, after the layer ``caa_layer`` ("auto": CAA's
    sweep on the fold's validation questions); adds multiplier × that vector there. Never reads test questions."""
    multiplier = float(_opt(ctx, "caa_multiplier", CAA_DEFAULTS["caa_multiplier"]))
    seed = int(_opt(ctx, "seed", CAA_DEFAULTS["seed"]))
    layers, auto = _caa_layers(ctx)
    train = ab_pairs(_caa_items(ctx, "train", True, seed), seed)
    if not train:
        raise ValueError("CAA needs training questions with both correct and incorrect answers")
    _ab_encode(ctx.lm, train)  # the letter is the last token of every text: where the capture reads
    n = len(train)
    acts = capture(ctx.lm, [p.positive for p in train] + [p.negative for p in train], layers, "residual",
                   batch_size=ctx.capture_batch_size)
    vectors = {layer: mean_pair_difference(acts[layer][:n], acts[layer][n:]) for layer in layers}
    sweep = _caa_sweep(ctx, vectors, seed) if auto else {"layer": layers[0]}
    layer = sweep.pop("layer")
    return Intervention("caa", "residual", {layer: AdditiveShift(multiplier * vectors[layer])}, {
        **_shape_config(acts[layer], ctx), "multiplier": multiplier, "layer": layer,
        "layer_choice": "auto (validation sweep)" if auto else "fixed", "seed": seed, "n_train_pairs": n,
        "train_desirable_at_A": sum(p.desirable == "A" for p in train), **sweep})


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
        yield _padded([encoded[i] for i in order[start : start + batch]], tok.pad_token_id)


def _padded(seqs: list[Encoded], pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``(input_ids, attention_mask, labels)``; labels are -100 except on the answer tokens."""
    t = max(len(e.ids) for e in seqs)
    ids = torch.full((len(seqs), t), pad, dtype=torch.long)
    attn = torch.zeros(len(seqs), t, dtype=torch.long)
    labels = torch.full((len(seqs), t), -100, dtype=torch.long)
    for b, e in enumerate(seqs):
        ids[b, : len(e.ids)] = torch.tensor(e.ids)
        attn[b, : len(e.ids)] = 1
        labels[b, e.answer] = torch.tensor([e.ids[i] for i in e.answer])
    return ids, attn, labels


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
    """LoFiT, ``lofit-sft`` variant: stage 1 learns per-head scalings (L1) on every head and keeps the top K;
    stage 2 learns the bias offsets of those heads, with the LM loss on the training questions' correct answers
    (``Q: {q}\nA: {a}``); A and v start at 0. The released TruthfulQA recipe is :func:`_fit_lofit_dpo`."""
    spec = ctx.lm.spec
    if ctx.site != "heads":
        raise ValueError("LoFiT edits attention-head outputs: use --site heads")
    k = int(_opt(ctx, "lofit_k", max(1, round(LOFIT_K_FRACTION * spec.n_layers * spec.n_heads))))
    l1 = float(_opt(ctx, "lofit_l1", LOFIT_DEFAULTS["lofit_l1"]))
    lr = float(_opt(ctx, "lofit_lr", LOFIT_DEFAULTS["lofit_lr"]))
    epochs1, epochs2 = _lofit_epochs(ctx, LOFIT_EPOCHS)
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
    stage2 = _masked_stage2(chosen, heads, dim)
    loss2 = _lofit_train(ctx, stage2, [m.v for m in stage2.values()], epochs2, 0.0, lr, LOFIT_BATCH, rows, gen,
                         "stage 2 (offsets)")
    for m in stage2.values():
        m.cpu()
    iv = Intervention("lofit-sft", "heads", stage2, {
        "heads": heads, "head_dim": dim, "model": ctx.lm.identity, "data_checksum": ctx.data_checksum,
        "objective": "sft", "init": "zeros", "heads_per_stage": [heads * spec.n_layers, len(chosen)],
        "fold": ctx.fold.fold, "k": len(chosen), "l1": l1, "lr": lr, "epochs": [epochs1, epochs2],
        "batch_size": LOFIT_BATCH, "heads_chosen": chosen, "n_train_answers": len(rows),
        "stage1_loss": [loss1[0], loss1[-1]], "stage2_loss": [loss2[0], loss2[-1]]})
    iv.position_policy = "all"
    return iv


def _build_lofit(config: dict, tensors: dict[str, torch.Tensor]) -> HeadScaleBias:
    return HeadScaleBias(*tensors["A"].shape)


def _lofit_epochs(ctx: FitContext, default: tuple[int, int]) -> tuple[int, int]:
    """Epochs of (stage 1, stage 2): option ``lofit_epochs`` sets both, else the variant's default."""
    n = ctx.options.get("lofit_epochs")
    return default if n is None else (int(n), int(n))


def _dpo_answer(ctx: FitContext, question: str, answer: str) -> Encoded:
    """``Q: {question} A: {answer}`` + EOS; the scored span is the answer's tokens and the EOS (trl 0.8.1's
    ``DPOTrainer.tokenize_row`` appends EOS to every chosen and rejected answer). The released prompt is
    ``"Q: {question} A:"`` (``utils/dataloaders.py``), which trl joins to the answer with no separator; we keep the
    space, as the released evaluation and our own capture/scoring texts (``qa_text``) do."""
    prompt = f"Q: {question} A: "
    e = encode(ctx.lm, prompt + answer, len(prompt))
    eos = ctx.lm.tokenizer.eos_token_id
    if eos is None or e.ids[-1] == eos:
        return e
    return Encoded([*e.ids, eos], [*e.answer, len(e.ids)])


def _dpo_pairs(ctx: FitContext) -> list[tuple[Encoded, Encoded]]:
    """One (best answer, first incorrect answer) pair per *training* question (never validation or test): the
    released loader (``utils/dataloaders.py``, ``TQA.format_tqa_prompts``) takes the chosen answers from
    ``mc2_targets`` = [Best Answer] + Incorrect Answers and truncates chosen and rejected to equal length, 1."""
    pairs = [(_dpo_answer(ctx, q.question, q.best_answer), _dpo_answer(ctx, q.question, q.incorrect[0]))
             for q in (ctx.questions[i] for i in ctx.fold.train) if q.incorrect]
    if not pairs:
        raise ValueError("LoFiT (DPO) needs training questions with an incorrect answer")
    return pairs


def _answer_logps(lm: LoadedModel, seqs: list[Encoded], device: torch.device) -> torch.Tensor:
    """Summed answer log-probs ``[len(seqs)]`` of right-padded ``seqs`` in one forward pass (hooks as installed)."""
    tok = lm.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    ids, attn, labels = _padded(seqs, pad)
    lo = min(e.answer[0] for e in seqs) - 1  # no logits before the first position that predicts an answer token
    logits = lm.model(input_ids=ids.to(device), attention_mask=attn.to(device),
                      logits_to_keep=torch.arange(lo, ids.shape[1], device=device)).logits
    return sequence_logprobs(logits, labels[:, lo:].to(device))


@torch.no_grad()
def _reference_logps(lm: LoadedModel, pairs: list[tuple[Encoded, Encoded]], batch: int) -> torch.Tensor:
    """``[pairs, 2]`` (chosen, rejected) log-probs of the unintervened model, computed once before training."""
    device = next(lm.model.parameters()).device
    flat = [e for pair in pairs for e in pair]
    out = [_answer_logps(lm, flat[s : s + 2 * batch], device).float().cpu() for s in range(0, len(flat), 2 * batch)]
    return torch.cat(out).view(-1, 2)


def _dpo_step(lm: LoadedModel, pairs: list, ref: torch.Tensor, idx: list[int], beta: float,
              device: torch.device) -> torch.Tensor:
    """The DPO loss of the pairs ``idx``: chosen and rejected answers in one forward pass (as trl concatenates)."""
    logps = _answer_logps(lm, [pairs[i][0] for i in idx] + [pairs[i][1] for i in idx], device)
    r = ref[idx].to(device)
    return dpo_loss(logps[: len(idx)], logps[len(idx) :], r[:, 0], r[:, 1], beta)


def _dpo_train(ctx: FitContext, modules: dict, params: list, pairs: list, ref: torch.Tensor, epochs: int,
               l1: float, lr: float, beta: float, gen: torch.Generator, label: str) -> list[list[float]]:
    """One LoFiT stage with the DPO objective (+ L1 on the trained parameters); per-epoch lists of batch losses.

    As the released HF Trainer run: AdamW without weight decay, the learning rate decayed linearly to 0, the
    gradient norm clipped at 1.0, the pairs reshuffled every epoch."""
    from contextlib import ExitStack

    from bench.sites import hooked

    lm = ctx.lm
    device = next(lm.model.parameters()).device
    for m in modules.values():
        m.to(device)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    total = epochs * ((len(pairs) + DPO_BATCH - 1) // DPO_BATCH)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: max(0.0, (total - step) / total))
    losses: list[list[float]] = []
    with Progress(TextColumn(f"[bold]LoFiT (DPO) {label} fold {ctx.fold.fold}"), BarColumn(),
                  TextColumn("{task.completed}/{task.total} batches"), TextColumn("loss {task.fields[loss]:.4g}"),
                  TimeRemainingColumn(), transient=True) as bar, ExitStack() as stack, torch.enable_grad():
        task = bar.add_task("lofit", total=total, loss=float("nan"))
        for layer, m in modules.items():
            stack.enter_context(hooked(lm.model, lm.spec, layer, "heads", m, "all"))
        for _ in range(epochs):
            losses.append([])
            order = torch.randperm(len(pairs), generator=gen).tolist()
            for start in range(0, len(order), DPO_BATCH):
                loss = _dpo_step(lm, pairs, ref, order[start : start + DPO_BATCH], beta, device)
                opt.zero_grad(set_to_none=True)
                (loss + l1 * l1_penalty(modules) if l1 else loss).backward()
                torch.nn.utils.clip_grad_norm_(params, DPO_MAX_GRAD_NORM)
                opt.step()
                sched.step()
                losses[-1].append(float(loss.detach()))
                bar.update(task, advance=1, loss=losses[-1][-1])
    return losses


def _masked_stage2(chosen: list[tuple[int, int]], heads: int, dim: int) -> dict[int, HeadScaleBias]:
    """Stage-2 modules: one per layer holding a chosen head, masked to its chosen heads, A frozen at 0."""
    stage2 = {}
    for layer in sorted({layer for layer, _ in chosen}):
        m = HeadScaleBias(heads, dim)
        m.head_mask.zero_()
        for lay, h in chosen:
            if lay == layer:
                m.head_mask[h] = 1
        m.A.requires_grad_(False)
        stage2[layer] = m
    return stage2


def _dpo_summary(losses: list[list[float]]) -> dict:
    flat = [x for epoch in losses for x in epoch]
    return {"first_last": [flat[0], flat[-1]], "epoch_means": [sum(e) / len(e) for e in losses]}


def _fit_lofit_dpo(ctx: FitContext) -> Intervention:
    """LoFiT, the released TruthfulQA recipe (defaults and sources in ``baselines/lofit.py``): stage 1 learns the
    scalings A ~ N(0, 1e-3²) of every head with DPO + L1 and keeps the K heads with the largest ‖A‖; stage 2 learns
    those heads' offsets v ~ N(0, 1e-3²) with DPO (A = 0). Pairs: (best, first incorrect) answer of each training
    question; reference log-probs from the unintervened model, computed once."""
    spec = ctx.lm.spec
    if ctx.site != "heads":
        raise ValueError("LoFiT edits attention-head outputs: use --site heads")
    heads, dim = spec.site_shape("heads")
    n_all = heads * spec.n_layers
    k = int(_opt(ctx, "lofit_k", max(1, round(DPO_K_FRACTION * n_all))))
    l1 = float(_opt(ctx, "lofit_l1", DPO_L1))
    beta = float(_opt(ctx, "lofit_beta", DPO_BETA))
    lrs = DPO_LR if ctx.options.get("lofit_lr") is None else (float(ctx.options["lofit_lr"]),) * 2
    epochs = _lofit_epochs(ctx, DPO_EPOCHS)
    gen = torch.Generator().manual_seed(int(_opt(ctx, "seed", LOFIT_DPO_DEFAULTS["seed"])))
    pairs = _dpo_pairs(ctx)
    ref = _reference_logps(ctx.lm, pairs, DPO_BATCH)
    stage1 = {layer: HeadScaleBias(heads, dim) for layer in range(spec.n_layers)}
    for m in stage1.values():
        init_normal_(m, "A", DPO_INIT_STD, gen)
        m.v.requires_grad_(False)
    loss1 = _dpo_train(ctx, stage1, [m.A for m in stage1.values()], pairs, ref, epochs[0], l1, lrs[0], beta, gen,
                       "stage 1 (scalings, L1)")
    chosen = select_heads(stage1, k)
    stage2 = _masked_stage2(chosen, heads, dim)
    for m in stage2.values():
        init_normal_(m, "v", DPO_INIT_STD, gen)
    loss2 = _dpo_train(ctx, stage2, [m.v for m in stage2.values()], pairs, ref, epochs[1], 0.0, lrs[1], beta, gen,
                       "stage 2 (offsets)")
    for m in stage2.values():
        m.cpu()
    s1, s2 = _dpo_summary(loss1), _dpo_summary(loss2)
    iv = Intervention("lofit", "heads", stage2, {
        "heads": heads, "head_dim": dim, "model": ctx.lm.identity, "data_checksum": ctx.data_checksum,
        "fold": ctx.fold.fold, "objective": "dpo", "beta": beta, "init": f"normal(0, std={DPO_INIT_STD:g})",
        "reference": "unintervened model", "pairs": "best answer vs first incorrect answer, training questions",
        "heads_per_stage": [n_all, len(chosen)], "stage1_saved_heads": round(DPO_STAGE1_SAVED_FRACTION * n_all),
        "k": len(chosen), "l1": l1, "lr": list(lrs), "epochs": list(epochs), "batch_size": DPO_BATCH,
        "released_epochs": list(DPO_RELEASED_EPOCHS),
        "lr_schedule": "linear to 0", "max_grad_norm": DPO_MAX_GRAD_NORM, "heads_chosen": chosen,
        "n_train_pairs": len(pairs), "stage1_loss": s1["first_last"], "stage2_loss": s2["first_last"],
        "stage1_epoch_loss": s1["epoch_means"], "stage2_epoch_loss": s2["epoch_means"]})
    iv.position_policy = "all"
    return iv


register(Method("none", "no intervention (the unintervened model)", _fit_none, _build_none, needs_layer=False))
register(Method("florain", "FLORAIN: per-question ellipsoids + low-rank nonlinear map on all heads of one layer",
                _fit_florain, _build_florain,
                options=(*(f.name for f in fields(FlorainConfig)), "drop_identity"),
                defaults={**{f.name: f.default for f in fields(FlorainConfig)}, "drop_identity": False},
                version=2))  # 2: the paper's raw extrapolation with λ = 5 (1: released unit form, λ = 8 norms)
register(Method("iti", "ITI: α σ θ̂ mass-mean shift on the top-K probe heads", _fit_iti, _build_shift,
                needs_layer=False, options=("iti_alpha", "iti_k", "iti_layer", "iti_rank", "iti_sigma_bank", "seed"),
                defaults=ITI_DEFAULTS, version=2))  # 2: σ from the gen_end_q bank (1: from the qa bank)
register(Method("mean-shift", "control: global μ⁺ − μ⁻ added at FLORAIN's site and layer", _fit_mean_shift,
                _build_shift, options=("shift_scale", "shift_match"), defaults=SHIFT_DEFAULTS,
                version=2))  # 2: fitted on train + validation questions (1: train only)
register(Method("caa", "CAA: mean A/B-pair residual difference at the answer letter, layer chosen on validation",
                _fit_caa, _build_shift, needs_layer=False, options=("caa_multiplier", "caa_layer", "seed"),
                defaults=CAA_DEFAULTS, version=2))  # 2: A/B pairs (1: pooled free-text, now mean-diff-resid)
register(Method("mean-diff-resid", "pooled mean residual-stream difference of free-text answers at one layer",
                _fit_mean_diff_resid, _build_shift, options=("mean_diff_multiplier",), defaults=MEAN_DIFF_DEFAULTS))
register(Method("lofit", "LoFiT (released TruthfulQA recipe): per-head scaling (head selection) and bias offsets, "
                "DPO on (correct, incorrect) answer pairs", _fit_lofit_dpo, _build_lofit, needs_layer=False,
                options=(*LOFIT_OPTIONS, "lofit_beta"), defaults=LOFIT_DPO_DEFAULTS,
                version=2))  # 2: DPO (1: LM loss, now lofit-sft)
register(Method("lofit-sft", "LoFiT variant: per-head scaling (head selection) and bias offsets, LM loss on correct "
                "answers", _fit_lofit, _build_lofit, needs_layer=False, options=LOFIT_OPTIONS, defaults=LOFIT_DEFAULTS))
register(Method("few-shot", "few-shot prompting with training-fold questions", _fit_few_shot, _build_none,
                needs_layer=False, options=("shots",), defaults=FEW_SHOT_DEFAULTS))
