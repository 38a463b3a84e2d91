"""TruthfulQA MC1/MC2/MC3: score every answer of each test question, with the intervention on the answer tokens."""

from __future__ import annotations

from bench.data.truthfulqa import Question
from bench.metrics.mc import mc_metrics
from bench.models import LoadedModel
from bench.prompts import mc_context
from bench.scoring import Encoded, answer_logprobs, encode


def mc_sequences(lm: LoadedModel, questions: list[Question], mode: str = "iti", fewshot: str = ""
                 ) -> tuple[list[Encoded], list[tuple[int, str]]]:
    """Every (question, distinct answer) pair tokenised for scoring, and its ``(question index, answer)`` slot."""
    seqs, slots = [], []
    for q in questions:
        context, sep = mc_context(q.question, mode, fewshot)
        answers = list(dict.fromkeys([q.best_answer, *q.correct, *q.incorrect]))
        # lm-eval scores its target delimiter with the answer (continuation " " + answer): where the tokenizer
        # keeps that space as its own token (before digits, in Llama-3-style tokenizers) it is part of the score
        start = len(context) if mode == "lm-eval" else len(context) + len(sep)
        for a in answers:
            seqs.append(encode(lm, context + sep + a, start))
            slots.append((q.index, a))
    return seqs, slots


def evaluate_mc(lm: LoadedModel, questions: list[Question], intervention=None, mode: str = "iti",
                batch_size: int = 16, prefix_cache: bool = True, fewshot: str = "",
                label: str = "MC scoring", edit_offset: int = 0) -> list[dict]:
    """Per-question records: index, mc1, mc2, mc3 and the answer log-probs.

    ``edit_offset`` N: the intervention edits the answer tokens from the (N+1)-th on, so the first N+1 answer
    tokens' probabilities are the unintervened model's (0: only the first one's; ITI's code: 1)."""
    seqs, slots = mc_sequences(lm, questions, mode, fewshot)
    scores = answer_logprobs(lm, seqs, intervention, batch_size=batch_size, prefix_cache=prefix_cache,
                             edit_offset=edit_offset, progress=f"{label} ({len(questions)} questions, {len(seqs)} answers)")
    by_q: dict[int, dict[str, float]] = {}
    for (qi, a), s in zip(slots, scores):
        by_q.setdefault(qi, {})[a] = s
    records = []
    for q in questions:
        s = by_q[q.index]
        m = mc_metrics(s[q.best_answer], [s[a] for a in q.correct], [s[a] for a in q.incorrect])
        records.append({"index": q.index, **m, "logprobs": s})
    return records
