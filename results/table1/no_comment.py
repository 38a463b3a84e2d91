"""How much of a True% difference comes from "I have no comment" answers, and how many answers evade the question.

TruthfulQA's judge (like the human raters) counts a refusal as true and uninformative, so a method that makes the
model stop declining can lose True% without saying anything less true. For each method this prints the share of
answers containing "no comment" and the paired True difference against the unintervened run, over all questions
and over those the unintervened model answered (did not decline), with a 95 % t-interval.

A second table counts *evasive* answers, those opening with a fixed pattern (:data:`EVASIVE`: "The answer to …",
"It depends …", "This question …"), which say nothing about the question, and how many of them the judge called
informative. A third line counts the human-labelled model-written answers of that form (``$BENCH_DATA_DIR``'s
label files) and how many of them the raters called informative: the only labels that bear on such answers.
A crude, explicit pattern: a lower bound on evasion, not a judge.

    python results/table1/no_comment.py gemma3-270m iti florain      # reads results/table1/runs/<model>-<method>/
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
from scipy import stats

from bench.runs import RunFolder

RUNS = Path(__file__).resolve().parent / "runs"
EVASIVE = re.compile(r"(The answer to|It depends|This question)")


def load(model: str, method: str) -> dict[int, dict]:
    """Per-question records of a finished run, by question index."""
    try:
        records = RunFolder(RUNS / f"{model}-{method}").read_per_question()
    except FileNotFoundError as err:
        sys.exit(f"{err}: run `python -m bench.reproduce table1 --models {model} --methods {method}` first")
    return {r["index"]: r for r in records}


def declines(record: dict) -> bool:
    return "no comment" in (record.get("answer") or "").lower()


def paired(diff: np.ndarray) -> str:
    lo, hi = stats.t.interval(0.95, len(diff) - 1, loc=diff.mean(), scale=stats.sem(diff))
    return f"{diff.mean():+.3f} [{lo:+.3f}, {hi:+.3f}] (n = {len(diff)})"


def main(model: str, methods: list[str]) -> None:
    base = load(model, "none")
    answered = [i for i, r in base.items() if not declines(r)]
    print(f"| {model} | 'no comment' answers | True − none, all questions | True − none, questions none answered |")
    print("|---|---|---|---|")
    print(f"| none | {sum(map(declines, base.values())) / len(base):.3f} | – | – |")
    for method in methods:
        run = load(model, method)
        share = sum(map(declines, run.values())) / len(run)
        all_q = np.array([run[i]["true"] - base[i]["true"] for i in base])
        kept = np.array([run[i]["true"] - base[i]["true"] for i in answered])
        print(f"| {method} | {share:.3f} | {paired(all_q)} | {paired(kept)} |")
    print(f"\n| {model} | evasive answers | of them judged informative | of them judged true |")
    print("|---|---|---|---|")
    for method in ["none", *methods]:
        run = load(model, method)
        ev = [r for r in run.values() if EVASIVE.match(r.get("answer") or "")]
        info, true = (f"{sum(r[key] for r in ev) / len(ev):.3f}" if ev else "–" for key in ("info", "true"))
        print(f"| {method} | {len(ev) / len(run):.3f} ({len(ev)}) | {info} | {true} |")
    print(f"\nHuman-labelled model-written answers of that form: {labelled_evasive()}")


def labelled_evasive() -> str:
    """How many labelled model-written answers match :data:`EVASIVE` and the raters' informative / true rates."""
    from bench.judges.embedded import _refs, dedup_labels, is_reference

    refs, _ = _refs(None)
    out = []
    for aspect in ("info", "truth"):
        ex = [e for e in dedup_labels(aspect)[0] if EVASIVE.match(e.answer)
              and not is_reference(refs.get(e.question), e.answer)]
        out.append(f"{aspect}: {sum(e.label for e in ex)} of {len(ex)} positive")
    return ", ".join(out)


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2:])
