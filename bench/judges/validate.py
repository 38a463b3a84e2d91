"""Agreement of a judge with TruthfulQA's human labels, under two protocols.

* ``deployment`` – K-fold over the de-duplicated labelled answers: the judge has seen other answers to the same
  questions, exactly as the original GPT-judge had (fine-tuned on labels for all 817 questions, then used on
  answers of held-out models).
* ``new-questions`` – question-grouped K-fold: no question has labelled answers on both sides.

Trainable judges (``embedded``) are retrained on each training part; fixed judges (``openai``, ``hf``) are scored
on the labelled answers directly (both protocols are then the same number).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from sklearn.metrics import accuracy_score, balanced_accuracy_score, confusion_matrix
from sklearn.model_selection import GroupKFold, KFold

from bench.judges.base import ASPECTS, THRESHOLD, Judge, JudgeItem
from bench.judges.embedded import Example, _refs, dedup_labels, train_classifier

PROTOCOLS = ("deployment", "new-questions")


def agreement(y_true: Sequence[bool], p: Sequence[float], threshold: float = THRESHOLD) -> dict:
    """Accuracy, balanced accuracy and confusion counts of ``p ≥ threshold`` against the human labels."""
    y = np.asarray(y_true, int)
    pred = (np.asarray(p) >= threshold).astype(int)
    tn, fp, fn, tp = confusion_matrix(y, pred, labels=[0, 1]).ravel()
    return {"accuracy": float(accuracy_score(y, pred)), "balanced_accuracy": float(balanced_accuracy_score(y, pred)),
            "n": int(len(y)), "positive_rate_human": float(y.mean()), "positive_rate_judge": float(pred.mean()),
            "confusion": {"tp": int(tp), "fp": int(fp), "tn": int(tn), "fn": int(fn)}}


def splits(examples: Sequence[Example], protocol: str, folds: int, seed: int):
    idx = np.arange(len(examples))
    if protocol == "deployment":
        return KFold(folds, shuffle=True, random_state=seed).split(idx)
    if protocol == "new-questions":
        groups = np.array([e.question for e in examples], dtype=object)
        return GroupKFold(folds).split(idx, groups=groups)
    raise ValueError(f"unknown protocol {protocol!r}; valid: {', '.join(PROTOCOLS)}")


def validate_embedded(data_dir: str | Path | None = None, folds: int = 5, seed: int = 0,
                      protocols: Sequence[str] = PROTOCOLS, aspects: Sequence[str] = ASPECTS,
                      limit: int | None = None, echo=print) -> dict:
    """Cross-validated agreement of the embedded judge, retrained on each training part."""
    if folds < 2:
        raise ValueError(f"need at least 2 folds, got {folds}")
    refs, _ = _refs(data_dir)
    out: dict = {"judge": "embedded", "folds": folds, "seed": seed, "threshold": THRESHOLD, "results": {}}
    for aspect in aspects:
        examples, stats = dedup_labels(aspect, data_dir)
        if limit is not None:
            examples = [examples[i] for i in np.random.RandomState(seed).permutation(len(examples))[:limit]]
        y = np.array([e.label for e in examples])
        for protocol in protocols:
            t = time.perf_counter()
            p = np.zeros(len(examples))
            for k, (tr, te) in enumerate(splits(examples, protocol, folds, seed)):
                clf = train_classifier([examples[i] for i in tr], refs, seed)
                p[te] = clf.predict_proba([examples[i].question for i in te], [examples[i].answer for i in te])
                echo(f"{aspect} / {protocol}: fold {k + 1}/{folds} done ({time.perf_counter() - t:.0f} s)")
            res = {**agreement(y, p), "data": stats, "seconds": round(time.perf_counter() - t, 1)}
            out["results"].setdefault(aspect, {})[protocol] = res
    return out


def validate_fixed(judge: Judge, data_dir: str | Path | None = None, limit: int | None = None, seed: int = 0,
                   aspects: Sequence[str] = ASPECTS) -> dict:
    """Agreement of a judge that is not trained here, on (a seeded sample of) the de-duplicated labelled answers."""
    refs, _ = _refs(data_dir)
    out: dict = {"judge": judge.identity(), "threshold": THRESHOLD, "results": {}}
    for aspect in aspects:
        examples, stats = dedup_labels(aspect, data_dir)
        if limit is not None:
            examples = [examples[i] for i in np.random.RandomState(seed).permutation(len(examples))[:limit]]
        items = []
        for e in examples:
            ref = refs.get(e.question)
            items.append(JudgeItem(e.question, e.answer, ref.correct if ref else (), ref.incorrect if ref else ()))
        verdicts = judge.judge(items)
        p = [v.p_true if aspect == "truth" else v.p_info for v in verdicts]
        res = {**agreement([e.label for e in examples], p), "data": stats}
        out["results"][aspect] = {proto: res for proto in PROTOCOLS}
    return out
