"""CAA (Rimsky et al. 2024, ``baselines/caa.py``) as a harness method: A/B-pair vectors, layer chosen on validation;
and ``mean-diff-resid``, a pooled CAA-like variant of free-text answers at one layer."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from baselines.caa import DEFAULT_MULTIPLIER, ABPair, ab_pairs, mean_pair_difference, pair_answers
from baselines.shift import AdditiveShift, mean_difference
from bench.capture import capture
from bench.interventions import Intervention, method
from bench.methods.context import FitContext, build_shift, shape_config
from bench.models import LoadedModel
from bench.options import option


@dataclass(frozen=True)
class CAAOptions:
    """CAA's options (defaults from CAA's code, see baselines/caa.py)."""

    multiplier: float = option(DEFAULT_MULTIPLIER, "multiplier of the mean A/B-pair residual difference",
                               label="CAA multiplier (× mean A/B-pair residual difference)", legacy="caa_multiplier")
    layer: int | str = option("auto", "a layer index, or auto: per fold, the layer whose vector most raises the "
                              "correct letter's probability on the fold's validation A/B prompts (CAA's layer sweep)",
                              choices=("auto",), low=0, label="layer (index; CAA's vector built and added there)",
                              legacy="caa_layer")


@dataclass(frozen=True)
class MeanDiffOptions:
    """mean-diff-resid's options."""

    multiplier: float = option(1.0, "multiplier of the pooled mean residual difference of free-text answers",
                               label="mean-diff-resid multiplier (× pooled mean residual difference)",
                               legacy="mean_diff_multiplier")


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


def _caa_layers(ctx: FitContext, choice: int | str) -> tuple[list[int], bool]:
    """The layers to build vectors at and whether CAA chooses among them (option ``layer``: an index or "auto")."""
    if choice == "auto":
        return list(range(ctx.lm.spec.n_layers)), True
    ctx.lm.spec.check_layer(int(choice))
    return [int(choice)], False


def _caa_sweep(ctx: FitContext, vectors: dict[int, torch.Tensor], seed: int) -> dict:
    """CAA's layer sweep on the fold's validation questions: each layer's vector at multiplier 1, scored by the
    mean normalised probability of the correct letter; the best layer (ties: the lowest)."""
    val = ab_pairs(_caa_items(ctx, "val", False, seed), seed)
    if not val:
        raise ValueError("CAA's layer=auto chooses its layer on the fold's validation questions and this fold has "
                         "none: use a validation share > 0 or set -O layer=N")
    layers = sorted(vectors)
    base, by_layer = _ab_scores(ctx.lm, _ab_encode(ctx.lm, val), vectors, ctx.capture_batch_size)
    scores = [by_layer[layer] for layer in layers]
    return {"layer": layers[int(np.argmax(scores))], "layers_swept": layers, "val_scores": scores,
            "val_score_unsteered": base, "n_val_prompts": len(val),
            "val_questions": sorted({p.group for p in val})}


@method("caa", "CAA: mean A/B-pair residual difference at the answer letter, layer chosen on validation",
        build=build_shift, options=CAAOptions, needs_layer=False,
        version=2)  # 2: A/B pairs (1: pooled free-text, now mean-diff-resid)
def fit(ctx: FitContext, options: CAAOptions) -> Intervention:
    """CAA (``baselines/caa.py``): the mean over A/B pairs of the training questions of the residual-stream
    difference (desirable − undesirable letter) at the letter token, after the layer ``layer`` ("auto": CAA's
    sweep on the fold's validation questions); adds multiplier × that vector there. Never reads test questions."""
    multiplier, seed = options.multiplier, ctx.seed
    layers, auto = _caa_layers(ctx, options.layer)
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
        **shape_config(acts[layer], ctx), "multiplier": multiplier, "layer": layer,
        "layer_choice": "auto (validation sweep)" if auto else "fixed", "seed": seed, "n_train_pairs": n,
        "train_desirable_at_A": sum(p.desirable == "A" for p in train), **sweep})


@method("mean-diff-resid", "pooled mean residual-stream difference of free-text answers at one layer",
        build=build_shift, options=MeanDiffOptions)
def fit_mean_diff_resid(ctx: FitContext, options: MeanDiffOptions) -> Intervention:
    """A pooled CAA-like variant: multiplier × (mean residual stream of the desirable free-text answers − that of
    the undesirable ones), last token, training fold (train + validation questions), at the run's one layer."""
    multiplier = options.multiplier
    acts, labels, groups = ctx.activations(site="residual")
    rows = ctx.split(groups, "train") | ctx.split(groups, "val")
    shift = multiplier * mean_difference(acts[ctx.layer][rows], labels[rows])
    return Intervention("mean-diff-resid", "residual", {ctx.layer: AdditiveShift(shift)},
                        {**shape_config(acts[ctx.layer], ctx), "multiplier": multiplier})

