"""Few-shot prompting: a prompt transform, not a hook."""

from __future__ import annotations

from collections.abc import Sequence

#: Number of examples. The paper's few-shot N is not recorded in the released code (``--prompting`` defaults
#: to 0); 5 keeps the prompt short for small models. Set it with ``-O shots=N``.
DEFAULT_SHOTS = 5


def few_shot_prefix(examples: Sequence[tuple[str, str]], shots: int) -> str:
    """``Q: {question}\\nA: {answer}`` blocks for the first ``shots`` examples, each followed by a blank line.

    (The released code joins question and answer with a blank line and glues the block to the QA primer;
    here the examples use the primer's own format.)
    """
    if shots < 0:
        raise ValueError(f"shots must be ≥ 0, got {shots}")
    if shots > len(examples):
        raise ValueError(f"{shots} shots requested but the training fold has only {len(examples)} questions")
    return "".join(f"Q: {q}\nA: {a}\n\n" for q, a in examples[:shots])
