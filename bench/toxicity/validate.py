"""Agreement of toxicity scorers with Perspective on the held-out split of the embedded scorer's data.

For each scorer: AUROC (label: Perspective toxicity >= 0.5), Spearman correlation with the Perspective score,
Brier score, a 10-bin reliability table, the same by source (RTP prompts, GPT-2 generations, human
continuations) and the task-level numbers (expected max toxicity, toxicity probability) on the held-out
prompts that have 25 scored GPT-2 generations, next to Perspective's own. ``profanity-check`` is the floor.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from bench.toxicity.base import THRESHOLD, get_scorer
from bench.toxicity.data import ScoredText, load_scored_texts
from bench.toxicity.embedded import VAL_FRACTION, fit_model, heldout_metrics, read_metadata, split_heldout
from bench.toxicity.metrics import expected_max_toxicity, toxicity_probability

DEFAULT_SCORERS = ("embedded", "profanity-check")


def reliability(scores: Sequence[float], tox: Sequence[float], bins: int = 10) -> list[dict]:
    """Per equal-width bin of the predicted score: n, mean predicted, observed rate (tox >= 0.5), mean Perspective."""
    s, t = np.asarray(scores, float), np.asarray(tox, float)
    which = np.minimum((s * bins).astype(int), bins - 1)
    rows = []
    for b in range(bins):
        m = which == b
        rows.append({"bin": f"[{b / bins:.1f}, {(b + 1) / bins:.1f}{']' if b == bins - 1 else ')'}", "n": int(m.sum()),
                     "mean_predicted": float(s[m].mean()) if m.any() else None,
                     "observed_rate": float((t[m] >= THRESHOLD).mean()) if m.any() else None,
                     "mean_perspective": float(t[m].mean()) if m.any() else None})
    return rows


def _task_level(items: Sequence[ScoredText], scores: Sequence[float]) -> dict:
    """EMT and toxicity probability over held-out prompts with GPT-2 generations: the scorer vs Perspective."""
    ours, theirs = defaultdict(list), defaultdict(list)
    for it, s in zip(items, scores):
        if it.source == "generation":
            ours[it.group].append(s)
            theirs[it.group].append(it.toxicity)
    groups = sorted(ours)
    if not groups:
        return {"n_prompts": 0}
    a, b = [ours[g] for g in groups], [theirs[g] for g in groups]
    return {"n_prompts": len(groups),
            "expected_max_toxicity": {"scorer": expected_max_toxicity(a), "perspective": expected_max_toxicity(b)},
            "toxicity_probability": {"scorer": toxicity_probability(a), "perspective": toxicity_probability(b)}}


def evaluate(scores: Sequence[float], items: Sequence[ScoredText]) -> dict:
    """All agreement numbers of ``scores`` on ``items``."""
    tox = [it.toxicity for it in items]
    out = heldout_metrics(scores, tox)
    out["reliability"] = reliability(scores, tox)
    by_source = {}
    for src in ("prompt", "generation", "human"):
        idx = [i for i, it in enumerate(items) if it.source == src]
        if idx:
            m = heldout_metrics([scores[i] for i in idx], [tox[i] for i in idx])
            by_source[src] = {k: m[k] for k in ("auroc", "spearman", "n", "n_positive")}
    out["by_source"] = by_source
    out["task_level"] = _task_level(items, scores)
    return out


def _check_embedded(files: dict, seed: int, options: dict) -> None:
    meta = read_metadata(options.get("model_dir"))
    if meta is None:
        return  # it will be trained on this split when built
    if meta.get("seed") != seed:
        raise ValueError(f"the embedded scorer was trained with seed {meta.get('seed')}, so seed {seed}'s held-out "
                         f"split overlaps its training texts: validate with --seed {meta.get('seed')} or retrain "
                         f"with `bench toxicity train --seed {seed} --force`")
    trained = {k: v.get("sha256") for k, v in meta.get("files", {}).items()}
    if trained != {k: v["sha256"] for k, v in files.items()}:
        raise ValueError("the embedded scorer was trained on different data files than the ones validated on; "
                         "retrain with `bench toxicity train --force` (same --data-dir)")


def validate_scorers(names: Sequence[str] = DEFAULT_SCORERS, data_dir: str | Path | None = None, seed: int = 0,
                     options: dict[str, dict] | None = None) -> dict:
    """Agreement of each scorer with Perspective on the held-out split (``seed``) of the scored texts."""
    options = options or {}
    items, files = load_scored_texts(data_dir)
    _, val = split_heldout(items, seed)
    if not val:
        raise ValueError("the held-out split is empty")
    texts = [it.text for it in val]
    result = {"label": f"Perspective toxicity >= {THRESHOLD}", "seed": seed, "val_fraction": VAL_FRACTION,
              "files": files, "n": len(val), "n_positive": sum(it.toxicity >= THRESHOLD for it in val),
              "n_groups": len({it.group for it in val}), "scorers": {}}
    for name in names:
        opts = dict(options.get(name, {}))
        if name == "embedded":
            _check_embedded(files, seed, opts)
            opts.setdefault("data_dir", data_dir)
            opts.setdefault("seed", seed)
        scorer = get_scorer(name, **opts)
        start = time.perf_counter()
        scores = scorer.score(texts)
        entry = {"identity": scorer.identity(), **evaluate(scores, val),
                 "score_seconds": round(time.perf_counter() - start, 2)}
        result["scorers"][name] = entry
    return result


# --------------------------------------------------------------------------- model choice


def _wordllama_features() -> Callable[[Sequence[str]], np.ndarray]:
    import wordllama
    from wordllama import WordLlama

    wl = WordLlama.load(cache_dir=Path(wordllama.__file__).parent, disable_download=True)
    return lambda texts: wl.embed(list(texts), norm=True)


def compare_candidates(data_dir: str | Path | None = None, seed: int = 0) -> dict:
    """Held-out AUROC/Spearman/Brier of the candidate embedded models (how the embedded scorer was chosen).

    Candidates: TF-IDF + LR on hard labels; TF-IDF + soft-label LR; that + Platt scaling (the embedded
    scorer); WordLlama embeddings + LR (when ``wordllama`` is installed); the mean of TF-IDF and WordLlama.
    """
    from scipy.sparse import hstack
    from sklearn.linear_model import LogisticRegression

    items, _ = load_scored_texts(data_dir)
    train, val = split_heldout(items, seed)
    tr_texts, va_texts = [it.text for it in train], [it.text for it in val]
    tox = np.array([it.toxicity for it in train])
    labels = (tox >= THRESHOLD).astype(int)
    out: dict[str, dict] = {}
    times: dict[str, float] = {}

    start = time.perf_counter()
    model = fit_model(train, seed)
    times["tfidf-softlr-platt"] = time.perf_counter() - start
    preds = {"tfidf-softlr-platt": model.predict(va_texts)}
    preds["tfidf-softlr"] = 1 / (1 + np.exp(-model.decision(va_texts)))
    start = time.perf_counter()
    x_tr = hstack([model.words.transform(tr_texts), model.chars.transform(tr_texts)]).tocsr()
    x_va = hstack([model.words.transform(va_texts), model.chars.transform(va_texts)]).tocsr()
    hard = LogisticRegression(C=10.0, max_iter=2000).fit(x_tr, labels)
    preds["tfidf-lr"] = hard.predict_proba(x_va)[:, 1]
    times["tfidf-lr"] = time.perf_counter() - start
    try:
        embed = _wordllama_features()
    except ImportError:
        embed = None
    if embed is not None:
        start = time.perf_counter()
        wl = LogisticRegression(C=1.0, max_iter=5000).fit(embed(tr_texts), labels)
        preds["wordllama-lr"] = wl.predict_proba(embed(va_texts))[:, 1]
        times["wordllama-lr"] = time.perf_counter() - start
        preds["mean(tfidf-softlr-platt, wordllama-lr)"] = (preds["tfidf-softlr-platt"] + preds["wordllama-lr"]) / 2
    vtox = [it.toxicity for it in val]
    for name, p in preds.items():
        out[name] = heldout_metrics(p.tolist(), vtox)
        if name in times:
            out[name]["fit_seconds"] = round(times[name], 2)
    return {"seed": seed, "n_train": len(train), "n_validation": len(val), "candidates": out}
