"""ITI (Li et al. 2023, ``baselines/iti.py``) as a harness method: probes per head, top-K heads, α σ θ̂ shift."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from baselines.iti import DEFAULT_ALPHA, default_k, iti_shift, top_heads
from baselines.shift import AdditiveShift
from bench.capture import capture, qa_end_q_text
from bench.data.truthfulqa import Question
from bench.interventions import Intervention, method
from bench.methods.context import FitContext, build_shift, shape_config
from bench.options import option
from bench.probes import PROBE_SCORES

#: Where ITI's σ comes from: ``qa`` = the fold's "Q: {q} A: {a}" texts (those of θ); ``gen_end_q`` = ITI's own
#: bank, "Q: {q} A: {a} Q: {another question}", built from the fold's training and validation questions only.
ITI_SIGMA_BANKS = ("qa", "gen_end_q")


@dataclass(frozen=True)
class ITIOptions:
    """ITI's options (the strength from the ITI paper; K from its 48 of LLaMA-7B's 1,024 heads)."""

    alpha: float = option(DEFAULT_ALPHA, "strength α: the shift is α σ θ̂ (ITI paper; negative: the other way)",
                          label="ITI α (shift in σ units)", legacy="iti_alpha")
    k: int | None = option(None, "number of heads K (none: 48/1024 of the heads ranked, at least 1)", low=1,
                           label="ITI K (number of heads)", legacy="iti_k")
    layer: int | None = option(None, "rank only this layer's heads, for a layer sweep of ITI (none: every layer; K "
                               "then defaults to 48/1024 of the layer's heads)", low=0,
                               label="layer (index; ITI heads chosen within it)", legacy="iti_layer")
    rank: str = option("accuracy", "rank heads by validation probe accuracy (ITI) or auroc (for class-imbalanced "
                       "fitting texts, where every probe predicts the majority and accuracies tie)",
                       choices=PROBE_SCORES, label="ITI head ranking", legacy="iti_rank", sweep=False)
    sigma_bank: str | None = option(None, "activations of σ: gen_end_q = ITI's bank, 'Q: {q} A: {a} Q: {another "
                                    "question}', from the fold's training/validation questions only (ITI's spans "
                                    "all 817); qa = the 'Q: {q} A: {a}' activations of θ (none: gen_end_q for "
                                    "TruthfulQA answers, qa for continuations)", choices=ITI_SIGMA_BANKS,
                                    legacy="iti_sigma_bank", sweep=False)


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



@method("iti", "ITI: α σ θ̂ mass-mean shift on the top-K probe heads", build=build_shift, options=ITIOptions,
        needs_layer=False, version=2)  # 2: σ from the gen_end_q bank (1: from the qa bank)
def fit(ctx: FitContext, options: ITIOptions) -> Intervention:
    """Probes on every head of every layer (train split), top-K by validation accuracy, shift α σ θ̂ with θ and σ
    from the training fold (train + validation questions; never the test fold).

    The options are described in :class:`ITIOptions`; the σ bank is :func:`_iti_sigma_bank`.
    """
    spec = ctx.lm.spec
    alpha, rank_by, only = options.alpha, options.rank, options.layer
    bank = options.sigma_bank or ("gen_end_q" if ctx.text_format == "qa" else "qa")
    if bank == "gen_end_q" and ctx.text_format != "qa":  # before the activation capture, not after it
        raise ValueError(f"ITI σ bank gen_end_q needs TruthfulQA answers; {ctx.text_format} fitting texts take "
                         "sigma_bank=qa")
    if only is not None:
        spec.check_layer(only)
    layers = list(range(spec.n_layers)) if only is None else [only]
    k = options.k if options.k is not None else default_k(len(layers), spec.n_heads)
    acts, labels, groups = ctx.activations(layers)
    tr, va = ctx.split(groups, "train"), ctx.split(groups, "val")
    seed = ctx.seed
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
        **shape_config(acts[layers[0]], ctx), "alpha": alpha, "k": len(chosen), "heads_chosen": chosen,
        "sigma_bank": bank, "n_sigma_texts": int(fold_rows.sum()) if sigma is None else len(next(iter(sigma.values()))),
        "layer_restriction": only, "probe_score": rank_by,
        f"probe_val_{rank_by}": [float(accs[layers.index(lay), h]) for lay, h in chosen]})

