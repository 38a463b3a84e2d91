"""Agreement of toxicity scorers with Perspective on texts the embedded scorer never trained on.

Three sets, reported separately (:data:`bench.toxicity.embedded.SETS`): the Perspective-scored GPT-2 continuations
of ``prompted_gens_gpt2`` (2,497 of 100 prompts: the only model-written continuations with reference scores here,
and what ``--steer-data gpt2-gens`` fits on), its 100 human continuations, and the embedded scorer's held-out RTP
prompts (``seed``). For each: AUROC (label: Perspective toxicity >= 0.5) and Spearman with 95 % intervals from a
prompt-group bootstrap (``resamples``, seeded), Brier score and a reliability table. Task level, on the 100
prompts' continuations: expected max toxicity and toxicity probability by the scorer next to Perspective's, with
bootstrap intervals of the differences. ``profanity-check`` is the floor.
"""

from __future__ import annotations

import itertools
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from bench.toxicity.agreement import RESAMPLES, heldout_metrics, reliability, with_intervals
from bench.toxicity.base import THRESHOLD, ToxicityScorer, get_scorer
from bench.toxicity.data import ScoredText, load_scored_texts
from bench.toxicity.embedded import (
    BASES,
    SETS,
    VAL_FRACTION,
    cross_fitted,
    fit_stack,
    fit_tfidf,
    is_current,
    pool_counts,
    read_metadata,
    scorer_split,
    validation_sets,
)
from bench.toxicity.metrics import expected_max_toxicity, max_toxicity_per_prompt, toxicity_probability

DEFAULT_SCORERS = ("embedded", "profanity-check")


def _percentile_ci(values: np.ndarray) -> list[float]:
    return [float(v) for v in np.percentile(values, [2.5, 97.5])]


def _task_level(items: Sequence[ScoredText], scores: Sequence[float], resamples: int = RESAMPLES,
                seed: int = 0) -> dict:
    """EMT and toxicity probability over the prompts' continuations: the scorer vs Perspective, with bootstrap
    (over prompts) intervals of the differences and the Spearman correlation of the per-prompt maxima."""
    ours, theirs = defaultdict(list), defaultdict(list)
    for it, s in zip(items, scores):
        ours[it.group].append(s)
        theirs[it.group].append(it.toxicity)
    groups = sorted(ours)
    if not groups:
        return {"n_prompts": 0}
    a, b = [ours[g] for g in groups], [theirs[g] for g in groups]
    ma, mb = np.array(max_toxicity_per_prompt(a)), np.array(max_toxicity_per_prompt(b))
    idx = np.random.default_rng(seed).integers(0, len(groups), (resamples, len(groups)))

    def diff(x: np.ndarray, y: np.ndarray) -> dict:
        return {"difference": float((x - y).mean()), "difference_ci": _percentile_ci((x - y)[idx].mean(axis=1))}

    ta, tb = (ma >= THRESHOLD).astype(float), (mb >= THRESHOLD).astype(float)
    return {"n_prompts": len(groups), "n_texts": sum(map(len, a)), "resamples": resamples,
            "expected_max_toxicity": {"scorer": expected_max_toxicity(a), "perspective": expected_max_toxicity(b),
                                      **diff(ma, mb)},
            "toxicity_probability": {"scorer": toxicity_probability(a), "perspective": toxicity_probability(b),
                                     **diff(ta, tb)},
            "max_spearman": heldout_metrics(ma, mb)["spearman"]}


def evaluate(scorer: ToxicityScorer, sets: dict[str, list[ScoredText]], seed: int = 0,
             resamples: int = RESAMPLES) -> dict:
    """All agreement numbers of ``scorer`` on each set, scoring every text once."""
    start = time.perf_counter()
    texts = [it.text for part in sets.values() for it in part]
    flat = scorer.score(texts)
    seconds = time.perf_counter() - start
    out, task, pos = {}, {}, 0
    for name, part in sets.items():
        scores, pos = flat[pos:pos + len(part)], pos + len(part)
        tox = [it.toxicity for it in part]
        out[name] = {**with_intervals(scores, tox, [it.group for it in part], resamples, seed),
                     "reliability": reliability(scores, tox)}
        if name == "continuations":
            task = _task_level(part, scores, resamples, seed)
    return {"identity": scorer.identity(), "sets": out, "task_level": task, "score_seconds": round(seconds, 2)}


def _check_embedded(files: dict, seed: int, options: dict) -> None:
    meta = read_metadata(options.get("model_dir"))
    if not is_current(meta):
        return  # it will be trained (again) on this split when built
    if meta.get("seed") != seed:
        raise ValueError(f"the embedded scorer was trained with seed {meta.get('seed')}, so seed {seed}'s held-out "
                         f"split overlaps its training texts: validate with --seed {meta.get('seed')} or retrain "
                         f"with `bench toxicity train --seed {seed} --force`")
    trained = {k: v.get("sha256") for k, v in meta.get("files", {}).items()}
    if trained != {k: v["sha256"] for k, v in files.items()}:
        raise ValueError("the embedded scorer was trained on different data files than the ones validated on; "
                         "retrain with `bench toxicity train --force` (same --data-dir)")


def validate_scorers(names: Sequence[str] = DEFAULT_SCORERS, data_dir: str | Path | None = None, seed: int = 0,
                     options: dict[str, dict] | None = None, resamples: int = RESAMPLES) -> dict:
    """Agreement of each scorer with Perspective on the three validation sets (:data:`SETS`), separately."""
    options = options or {}
    items, files = load_scored_texts(data_dir)
    sets = validation_sets(items, seed)
    if not sets["continuations"]:
        raise ValueError("no Perspective-scored continuations to validate on (prompted_gens_gpt2.jsonl)")
    result = {"label": f"Perspective toxicity >= {THRESHOLD}", "seed": seed, "val_fraction": VAL_FRACTION,
              "bootstrap": {"resamples": resamples, "seed": seed, "unit": "prompt group", "interval": "95 % percentile"},
              "files": files, "scorer_data": pool_counts(items, seed),
              "sets": {k: {"description": SETS[k], "n": len(v), "n_positive": sum(it.toxicity >= THRESHOLD for it in v),
                           "n_groups": len({it.group for it in v})} for k, v in sets.items()},
              "scorers": {}}
    for name in names:
        opts = dict(options.get(name, {}))
        if name == "embedded":
            _check_embedded(files, seed, opts)
            opts.setdefault("data_dir", data_dir)
            opts.setdefault("seed", seed)
        result["scorers"][name] = evaluate(get_scorer(name, **opts), sets, seed, resamples)
    return result


# --------------------------------------------------------------------------- model choice

TFIDF_C = (1.0, 3.0, 10.0, 30.0)
MIN_GAIN = 0.002  # a candidate with more base scores must beat a simpler one by this much held-out AUROC


def choose_candidate(candidates: dict[str, dict]) -> str:
    """The rule: highest held-out-prompt AUROC, but the fewest base scores among those within :data:`MIN_GAIN`."""
    best = max(c["auroc"] for c in candidates.values())
    near = [n for n, c in candidates.items() if c["auroc"] >= best - MIN_GAIN]
    return min(near, key=lambda n: (len(candidates[n]["bases"]), -candidates[n]["auroc"]))


def compare_candidates(data_dir: str | Path | None = None, seed: int = 0) -> dict:
    """Held-out-prompt AUROC/Spearman/Brier of the candidate embedded models (how the embedded scorer was chosen).

    Everything is fitted on the scorer's training prompts and scored on its held-out RTP prompts only: the
    continuations (the validation set) play no part. Candidates: TF-IDF soft-label LR at several C (raw
    decisions); every stack (Platt scaling of one base) of TF-IDF (C = 10), WordLlama LR and profanity-check.
    """
    items, _ = load_scored_texts(data_dir)
    train, heldout = scorer_split(items, seed)
    tr_texts, va_texts = [it.text for it in train], [it.text for it in heldout]
    tox = np.array([it.toxicity for it in train], float)
    labels = (tox >= THRESHOLD).astype(int)
    va_tox = [it.toxicity for it in heldout]
    out: dict[str, dict] = {}
    for c in TFIDF_C:
        start = time.perf_counter()
        dec = fit_tfidf(tr_texts, tox, c).decision(va_texts)
        out[f"tfidf C={c:g} (raw decision)"] = {**heldout_metrics(1 / (1 + np.exp(-dec)), va_tox), "brier": None,
                                                "bases": ["tfidf"],
                                                "fit_seconds": round(time.perf_counter() - start, 2)}
    start = time.perf_counter()
    oof = cross_fitted(train, seed, list(BASES))
    decisions = {f: BASES[f](tr_texts, tox).decision(va_texts) for f in BASES}
    seconds = round(time.perf_counter() - start, 2)
    for k in range(1, len(BASES) + 1):
        for combo in itertools.combinations(BASES, k):
            coef, intercept = fit_stack(np.column_stack([oof[f] for f in combo]), labels)
            z = np.column_stack([decisions[f] for f in combo]) @ np.asarray(coef) + intercept
            out[" + ".join(combo) + " (stacked)"] = {**heldout_metrics(1 / (1 + np.exp(-z)), va_tox),
                                                     "bases": list(combo), "coef": list(coef), "intercept": intercept}
    return {"seed": seed, "n_train": len(train), "n_heldout": len(heldout), "cross_fit_seconds": seconds,
            "rule": f"highest held-out-prompt AUROC; among candidates within {MIN_GAIN} of it, the fewest base scores",
            "candidates": out, "chosen": choose_candidate(out)}
