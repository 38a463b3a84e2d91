"""Broken text for the judges: features that see it, synthetic corruptions to train on, and the real set.

* :func:`degeneracy_features` – label-free numbers that separate an answer from word salad and token loops:
  word/bigram/trigram repetition, zlib compression ratio, the longest run of one repeated word n-gram, the share
  of non-words and the mean Zipf frequency of the words (``wordfreq``), letters among characters, line count.
* :func:`corrupt` – synthetic broken versions of a real answer (``loop``, ``shuffle``, ``truncate``, ``noise``,
  ``salad``), the negatives the informativeness classifier is trained on (policy: broken text is not informative).
* :func:`real_degenerate_answers` – 774 broken answers written by our own intervened models (FLORAIN at a too
  large edit strength, ITI, LoFiT: e.g. ``"Ad\\n\\n#\\n\\n#…"``, ``"The answer is that the answer is that…"``), read
  one by one and kept as a validation set (never trained on). Stored as question index + answer in
  ``bench/reference/degenerate_answers.jsonl``.
"""

from __future__ import annotations

import json
import random
import re
import zlib
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np

KINDS = ("loop", "shuffle", "truncate", "noise", "salad")
REAL_SET = Path(__file__).resolve().parent.parent / "reference" / "degenerate_answers.jsonl"
_WORD = re.compile(r"[A-Za-z']+")
_TOKEN = re.compile(r"\S+")
FEATURE_NAMES = ("rep_word", "rep_bigram", "rep_trigram", "compression", "longest_loop", "nonword_share",
                 "mean_zipf", "letter_share", "lines", "n_words")


@lru_cache(maxsize=200_000)
def _zipf(word: str) -> float:
    from wordfreq import zipf_frequency

    return zipf_frequency(word, "en")


def _repetition(tokens: Sequence[str], n: int) -> float:
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def _longest_loop(tokens: Sequence[str]) -> int:
    """Most consecutive repeats of one n-gram (n = 1..4), e.g. 6 for ``a b a b a b a b a b a b``."""
    best = 1
    for n in range(1, 5):
        for offset in range(n):  # a loop may start anywhere
            run = 1
            for i in range(offset + n, len(tokens) - n + 1, n):
                run = run + 1 if tokens[i:i + n] == tokens[i - n:i] else 1
                best = max(best, run)
    return best


def degeneracy_features(answers: Sequence[str]) -> np.ndarray:
    """One row of :data:`FEATURE_NAMES` per answer."""
    rows = []
    for a in answers:
        tokens = [t.lower() for t in _TOKEN.findall(a)]
        words = [w.lower().strip("'") for w in _WORD.findall(a)]
        words = [w for w in words if w]
        raw = a.encode()
        zipfs = [_zipf(w) for w in words]
        rows.append([_repetition(tokens, 1), _repetition(tokens, 2), _repetition(tokens, 3),
                     len(zlib.compress(raw)) / max(len(raw), 1), _longest_loop(tokens),
                     float(np.mean([z == 0 for z in zipfs])) if zipfs else 1.0,
                     float(np.mean(zipfs)) if zipfs else 0.0,
                     sum(c.isalpha() for c in a) / max(len(a), 1), a.count("\n"), len(words)])
    return np.asarray(rows, float).reshape(len(answers), len(FEATURE_NAMES))


def _noise(text: str, rng: random.Random, rate: float) -> str:
    letters = "abcdefghijklmnopqrstuvwxyz"
    return "".join(rng.choice(letters) if c.isalpha() and rng.random() < rate else c for c in text)


def corrupt(answer: str, kind: str, rng: random.Random, pool: Sequence[str] = ()) -> str:
    """A broken version of ``answer``: ``loop`` (a short span repeated), ``shuffle`` (its words permuted),
    ``truncate`` (a fragment of the first words of an answer of ≥ 4 words), ``noise`` (a third of its letters replaced), ``salad`` (random
    words of ``pool`` answers, with loops)."""
    words = answer.split() or ["the"]
    if kind == "loop":
        start = rng.randrange(len(words))
        span = " ".join(words[start:start + rng.randint(1, 5)])
        sep = rng.choice([" ", " ", "\n\n", ", "])
        return sep.join([span] * rng.randint(5, 14))
    if kind == "shuffle" and len(words) >= 6:  # a short answer shuffled can still be an answer: salad instead
        rng.shuffle(words)
        return " ".join(words)
    if kind == "truncate" and len(words) >= 4:  # a fragment of a short answer can be the answer ("No."): salad
        cut = rng.randint(1, max(1, min(3, len(words) - 1)))
        return " ".join(words[:cut]) + rng.choice(["", " the", " of", " is", "-"])
    if kind == "noise":
        return _noise(answer, rng, rng.uniform(0.3, 0.6))
    if kind in ("salad", "shuffle", "truncate"):
        source = [w for a in rng.sample(list(pool), min(3, len(pool))) for w in a.split()] if pool else words
        out = [rng.choice(source) for _ in range(rng.randint(6, 20))]
        if rng.random() < 0.5:
            out += [out[-1]] * rng.randint(3, 8)
        return rng.choice([" ", "\n\n"]).join(out)
    raise ValueError(f"unknown corruption {kind!r}; valid: {', '.join(KINDS)}")


def corruptions(answers: Sequence[str], per_answer: float, seed: int) -> list[tuple[int, str, str]]:
    """``(source row, kind, broken text)`` for about ``per_answer × len(answers)`` corruptions (seeded)."""
    rng = random.Random(seed)
    out = []
    n = int(round(per_answer * len(answers)))
    for _ in range(n):
        i = rng.randrange(len(answers))
        kind = KINDS[len(out) % len(KINDS)]
        out.append((i, kind, corrupt(answers[i], kind, rng, answers)))
    return out


def real_degenerate_answers(path: Path = REAL_SET) -> list[dict]:
    """The committed real broken answers: ``{"index", "question_sha256" (first 16 hex digits of the stripped
    question's SHA-256, to check the question text without copying it), "answer", "source" (the run)}``."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
