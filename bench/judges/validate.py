"""Agreement of a judge with TruthfulQA's human labels, measured on the kind of text it judges.

The label files mix answers written by models with TruthfulQA's own reference answers (a third of the rows),
which a judge that reads the references gets right almost always. Every figure is therefore reported on
**model-written answers** (references excluded: :func:`bench.judges.embedded.is_reference`), with accuracy,
Cohen's κ and the judge's positive-rate bias (judge minus humans), under two protocols:

* ``deployment`` – K-fold over the de-duplicated labelled answers: the judge has seen other answers to the same
  questions, as the original GPT-judge had and as it has when it judges a run (all 817 questions are labelled);
* ``new-questions`` – question-grouped K-fold: no question has labelled answers on both sides.

Broken text: the share of answers called *informative* (and *true*) among (a) the real broken answers of our own
runs (:func:`bench.judges.degenerate.real_degenerate_answers`) and (b) synthetic corruptions of held-out answers.

Trainable judges (``embedded``) are retrained on each training part; their label-free representations (TF-IDF
vocabulary, WordLlama vectors, reference similarities) are computed once for all rows. Fixed judges (``openai``,
``hf``) are scored on the labelled answers directly (both protocols are then the same number).
"""

from __future__ import annotations

import hashlib
import time
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from sklearn.metrics import accuracy_score, balanced_accuracy_score, cohen_kappa_score, confusion_matrix
from sklearn.model_selection import GroupKFold, KFold

from bench.judges.base import ASPECTS, THRESHOLD, Judge, JudgeItem
from bench.judges.degenerate import corruptions, real_degenerate_answers
from bench.judges.embedded import (
    Example,
    Featurizer,
    Rows,
    _refs,
    dedup_labels,
    fit_aspect,
    is_reference,
    label_corpus,
)

PROTOCOLS = ("deployment", "new-questions")
#: the protocol whose figures are quoted beside the numbers a judge produces (it is how a run's answers are judged)
HEADLINE = "deployment"


def agreement(y_true: Sequence[bool], p: Sequence[float], threshold: float = THRESHOLD) -> dict:
    """Accuracy, balanced accuracy, Cohen's κ, positive-rate bias and confusion counts of ``p ≥ threshold``."""
    y = np.asarray(y_true, int)
    pred = (np.asarray(p) >= threshold).astype(int)
    tn, fp, fn, tp = confusion_matrix(y, pred, labels=[0, 1]).ravel()
    return {"accuracy": float(accuracy_score(y, pred)), "balanced_accuracy": float(balanced_accuracy_score(y, pred)),
            "kappa": float(cohen_kappa_score(y, pred)) if len(set(y)) > 1 or len(set(pred)) > 1 else 1.0,
            "n": int(len(y)), "positive_rate_human": float(y.mean()), "positive_rate_judge": float(pred.mean()),
            "bias": float(pred.mean() - y.mean()),
            "sensitivity": float(tp / (tp + fn)) if tp + fn else float("nan"),
            "specificity": float(tn / (tn + fp)) if tn + fp else float("nan"),
            "confusion": {"tp": int(tp), "fp": int(fp), "tn": int(tn), "fn": int(fn)}}


def splits(examples: Sequence[Example], protocol: str, folds: int, seed: int):
    idx = np.arange(len(examples))
    if protocol == "deployment":
        return KFold(folds, shuffle=True, random_state=seed).split(idx)
    if protocol == "new-questions":
        groups = np.array([e.question for e in examples], dtype=object)
        return GroupKFold(folds).split(idx, groups=groups)
    raise ValueError(f"unknown protocol {protocol!r}; valid: {', '.join(PROTOCOLS)}")


def _reference_mask(examples: Sequence[Example], refs: dict) -> np.ndarray:
    return np.array([is_reference(refs.get(e.question), e.answer) for e in examples])


def _scores(y: np.ndarray, p: np.ndarray, ref: np.ndarray) -> dict:
    return {"model_written": agreement(y[~ref], p[~ref]), "all_rows": agreement(y, p)}


def _broken_rates(p: np.ndarray) -> dict:
    """How many broken answers were judged (NaN: not judged by any fold) and the share called positive."""
    p = np.asarray(p, float)
    p = p[~np.isnan(p)]
    return {"n": int(len(p)), "positive_rate": float((p >= THRESHOLD).mean()) if len(p) else None}


def _real_broken(refs: dict) -> tuple[list[str], list[str]]:
    """Questions and answers of the real broken set whose question is in the loaded TruthfulQA (same text)."""
    by_index = {q.index: q.question.strip() for q in refs.values()}
    real = [r for r in real_degenerate_answers() if r["index"] in by_index
            and hashlib.sha256(by_index[r["index"]].encode()).hexdigest()[:16] == r["question_sha256"]]
    return [by_index[r["index"]] for r in real], [r["answer"] for r in real]


def _fold_of(question: str, folds: int) -> int:
    return zlib.crc32(question.encode()) % folds


def validate_embedded(data_dir: str | Path | None = None, folds: int = 5, seed: int = 0,
                      protocols: Sequence[str] = PROTOCOLS, aspects: Sequence[str] = ASPECTS,
                      limit: int | None = None, echo=print, featurizer: Featurizer | None = None) -> dict:
    """Cross-validated agreement of the embedded judge, retrained on each training part (see the module)."""
    if folds < 2:
        raise ValueError(f"need at least 2 folds, got {folds}")
    refs, _ = _refs(data_dir)
    t0 = time.perf_counter()
    feat = featurizer or Featurizer(refs, label_corpus(data_dir))
    bq, ba = _real_broken(refs)
    broken = Rows.build(feat, bq, ba)
    echo(f"representations ready ({time.perf_counter() - t0:.0f} s)")
    out: dict = {"judge": "embedded", "folds": folds, "seed": seed, "threshold": THRESHOLD, "results": {}}
    for aspect in aspects:
        examples, stats = dedup_labels(aspect, data_dir)
        if limit is not None:
            examples = [examples[i] for i in np.random.RandomState(seed).permutation(len(examples))[:limit]]
        rows = Rows.build(feat, [e.question for e in examples], [e.answer for e in examples])
        y, ref = np.array([e.label for e in examples], int), _reference_mask(examples, refs)
        for protocol in protocols:
            t = time.perf_counter()
            p, p_broken, p_synth, kinds = np.zeros(len(examples)), np.full(len(broken), np.nan), [], []
            for k, (tr, te) in enumerate(splits(examples, protocol, folds, seed)):
                clf = fit_aspect(feat, rows.take(tr), y[tr], aspect, seed)
                test = rows.take(te)
                p[te] = clf.predict_rows(test)
                mine = _broken_in_fold(broken, examples, te, protocol, k, folds)
                p_broken[mine] = clf.predict_rows(broken.take(mine))
                made = corruptions(test.answers, 0.2, seed + 1000 + k)
                p_synth += clf.predict_rows(Rows.build(feat, [test.questions[i] for i, _, _ in made],
                                                       [s for _, _, s in made])).tolist()
                kinds += [kind for _, kind, _ in made]
                echo(f"{aspect} / {protocol}: fold {k + 1}/{folds} done ({time.perf_counter() - t:.0f} s)")
            res = {**_scores(y, p, ref), "data": {**stats, "reference_rows": int(ref.sum())},
                   "broken_real": _broken_rates(p_broken), "broken_synthetic": _broken_rates(np.array(p_synth)),
                   "broken_synthetic_by_kind": {k: _broken_rates(np.array([x for x, c in zip(p_synth, kinds) if c == k]))
                                                for k in sorted(set(kinds))},
                   "seconds": round(time.perf_counter() - t, 1)}
            out["results"].setdefault(aspect, {})[protocol] = res
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def _broken_in_fold(broken: Rows, examples: Sequence[Example], te: np.ndarray, protocol: str, k: int,
                    folds: int) -> np.ndarray:
    """The real broken answers judged by fold ``k``'s model: those of its test questions (``new-questions``) or a
    fixed 1/``folds`` share (``deployment``)."""
    if protocol == "new-questions":
        held = {examples[i].question for i in te}
        return np.array([i for i, q in enumerate(broken.questions) if q in held], int)
    return np.array([i for i, q in enumerate(broken.questions) if _fold_of(f"{i}:{q}", folds) == k], int)


def validate_fixed(judge: Judge, data_dir: str | Path | None = None, limit: int | None = None, seed: int = 0,
                   aspects: Sequence[str] = ASPECTS) -> dict:
    """Agreement of a judge that is not trained here, on (a seeded sample of) the de-duplicated labelled answers
    and on the real broken answers."""
    refs, _ = _refs(data_dir)
    out: dict = {"judge": judge.identity(), "threshold": THRESHOLD, "results": {}}

    def items(qs: Sequence[str], answers: Sequence[str]) -> list[JudgeItem]:
        return [JudgeItem(q, a, refs[q].correct if q in refs else (), refs[q].incorrect if q in refs else ())
                for q, a in zip(qs, answers)]

    bq, ba = _real_broken(refs)
    if limit is not None:
        bq, ba = bq[:limit], ba[:limit]
    broken = judge.judge(items(bq, ba))
    for aspect in aspects:
        examples, stats = dedup_labels(aspect, data_dir)
        if limit is not None:
            examples = [examples[i] for i in np.random.RandomState(seed).permutation(len(examples))[:limit]]
        verdicts = judge.judge(items([e.question for e in examples], [e.answer for e in examples]))
        p = np.array([v.p_true if aspect == "truth" else v.p_info for v in verdicts])
        y, ref = np.array([e.label for e in examples], int), _reference_mask(examples, refs)
        res = {**_scores(y, p, ref), "data": {**stats, "reference_rows": int(ref.sum())},
               "broken_real": _broken_rates(np.array([v.p_true if aspect == "truth" else v.p_info for v in broken]))}
        out["results"][aspect] = {proto: res for proto in PROTOCOLS}
    return out


def summary(result: dict, protocol: str = HEADLINE) -> dict:
    """The judge's validated error as results and tables quote it: per aspect, agreement on model-written answers
    under ``protocol`` (and the other protocol's accuracy), plus the broken-answer informative rate."""
    out: dict = {"protocol": protocol, "folds": result.get("folds"),
                 "on": "model-written answers (TruthfulQA references excluded)"}
    for aspect, by in result["results"].items():
        r = by[protocol]["model_written"]
        out[aspect] = {k: round(r[k], 4) for k in ("accuracy", "kappa", "bias", "sensitivity", "specificity")}
        out[aspect]["n"] = r["n"]
        out[aspect]["accuracy_by_protocol"] = {p: round(v["model_written"]["accuracy"], 4) for p, v in by.items()}
        out[aspect]["broken_positive_rate"] = {k: by[protocol][k]["positive_rate"]
                                               for k in ("broken_real", "broken_synthetic") if k in by[protocol]}
    return out
