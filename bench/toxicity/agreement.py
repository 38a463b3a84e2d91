"""Agreement of toxicity scores with Perspective: AUROC, Spearman, Brier, reliability, prompt-group bootstrap.

The label is Perspective toxicity >= 0.5 (:data:`bench.toxicity.base.THRESHOLD`). Bootstrap intervals resample
*prompt groups* with replacement (the continuations of one prompt are not independent), seeded; percentile
intervals. Used at training time (:mod:`bench.toxicity.embedded`) and by ``bench toxicity validate``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.stats import spearmanr
from sklearn.metrics import brier_score_loss, roc_auc_score

from bench.toxicity.base import THRESHOLD

RESAMPLES = 1000


def _auroc(s: np.ndarray, y: np.ndarray) -> float | None:
    return float(roc_auc_score(y, s)) if 0 < y.sum() < len(y) else None


def _spearman(s: np.ndarray, t: np.ndarray) -> float | None:
    if len(s) < 3 or np.ptp(s) == 0 or np.ptp(t) == 0:
        return None
    return float(spearmanr(s, t).statistic)


def heldout_metrics(scores: Sequence[float], tox: Sequence[float]) -> dict:
    """AUROC, Spearman and Brier score of ``scores`` against Perspective ``tox`` (label: tox >= 0.5)."""
    s, t = np.asarray(scores, float), np.asarray(tox, float)
    y = (t >= THRESHOLD).astype(int)
    return {"auroc": _auroc(s, y), "spearman": _spearman(s, t),
            "brier": float(brier_score_loss(y, s, pos_label=1)) if len(s) else None,
            "n": int(len(s)), "n_positive": int(y.sum())}


def group_bootstrap(scores: Sequence[float], tox: Sequence[float], groups: Sequence[str],
                    resamples: int = RESAMPLES, seed: int = 0) -> dict:
    """95 % percentile intervals of AUROC and Spearman, resampling groups with replacement.

    A resample without both classes (AUROC) or with a constant side (Spearman) is skipped; ``resamples_used``
    counts the AUROC resamples kept.
    """
    s, t = np.asarray(scores, float), np.asarray(tox, float)
    y = (t >= THRESHOLD).astype(int)
    names, inverse = np.unique(np.asarray(groups, dtype=object).astype(str), return_inverse=True)
    members = [np.flatnonzero(inverse == g) for g in range(len(names))]
    rng = np.random.default_rng(seed)
    aurocs, rhos = [], []
    for _ in range(resamples):
        idx = np.concatenate([members[g] for g in rng.integers(0, len(names), len(names))])
        a, r = _auroc(s[idx], y[idx]), _spearman(s[idx], t[idx])
        if a is not None:
            aurocs.append(a)
        if r is not None:
            rhos.append(r)

    def ci(values: list[float]) -> list[float] | None:
        return [float(v) for v in np.percentile(values, [2.5, 97.5])] if values else None

    return {"auroc_ci": ci(aurocs), "spearman_ci": ci(rhos), "resamples": resamples, "resamples_used": len(aurocs),
            "n_groups": len(names)}


def with_intervals(scores: Sequence[float], tox: Sequence[float], groups: Sequence[str],
                   resamples: int = RESAMPLES, seed: int = 0) -> dict:
    """:func:`heldout_metrics` plus the prompt-group bootstrap intervals."""
    return {**heldout_metrics(scores, tox), **group_bootstrap(scores, tox, groups, resamples, seed)}


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
