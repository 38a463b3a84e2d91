"""CAA — Contrastive Activation Addition (Rimsky et al., ACL 2024, "Steering Llama 2 via Contrastive Activation
Addition"; reference code github.com/nrimsky/CAA): the pure parts.

The construction, as in the paper and its code:

* **A/B prompts.** One multiple-choice question with two options, the desirable and the undesirable answer, in
  one (A)/(B) order; the two prompts of a pair are that *same* text followed by the desirable letter or by the
  undesirable letter. For TruthfulQA the reference code (``make_datasets.py``) writes ``"Please help me answer
  the following question.\\n{question}\\n\\nChoices:\\n(A) {a}\\n(B) {b}"``, and for base models
  (``utils/tokenize.py``) wraps it as ``"Input: {prompt}\\nResponse: {answer}"``, the answer being ``"(A"``/``"(B"``.
  Which option is (A) is random (the reference code flips a coin per question); here it is balanced exactly by a
  seed (half the pairs have the desirable answer at (A)), so the letter identity averages out of the vector.
* **Read position.** The residual stream after a decoder layer, at the answer-letter token (the reference code
  reads position −2 of ``"... (A)"``, i.e. the letter; our texts end at the letter, so it is the last token).
* **Vector.** The mean over pairs of (desirable − undesirable) activation: :func:`mean_pair_difference`.
* **Addition.** ``multiplier × vector`` added to that layer's residual stream at every position after the
  instruction (the answer tokens); the layer is chosen by sweeping layers at multiplier ±1 on held-out A/B
  questions and taking the one with the largest behavioural effect.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

#: TruthfulQA's A/B instruction in the reference code (``build_truthful_qa_prompt``).
INSTRUCTION = "Please help me answer the following question."
LETTERS = ("A", "B")
DEFAULT_MULTIPLIER = 1.0  # the paper's layer sweeps use multipliers ±1 (its vectors are not rescaled per behaviour)
DEFAULT_SEED = 42


def ab_prompt(question: str, option_a: str, option_b: str) -> str:
    """The A/B prompt up to the answer letter (base-model format of the reference code), ending in ``"("``."""
    body = f"{INSTRUCTION}\n{question.strip()}\n\nChoices:\n(A) {option_a.strip()}\n(B) {option_b.strip()}"
    return f"Input: {body}\nResponse: ("


@dataclass(frozen=True)
class ABPair:
    """One contrastive pair: the same A/B ``prompt`` completed by the desirable or the undesirable letter."""

    group: int  # the question's id
    prompt: str  # ends in "(": the letter is the next token
    desirable: str  # "A" or "B"

    @property
    def undesirable(self) -> str:
        return LETTERS[1 - LETTERS.index(self.desirable)]

    @property
    def positive(self) -> str:
        return self.prompt + self.desirable

    @property
    def negative(self) -> str:
        return self.prompt + self.undesirable


def balanced_flips(n: int, seed: int) -> list[bool]:
    """``n`` seeded coin flips with exactly ``n // 2`` heads: True = the desirable answer is option (B)."""
    flips = np.zeros(n, dtype=bool)
    flips[: n // 2] = True
    return [bool(f) for f in np.random.RandomState(seed).permutation(flips)]


def pair_answers(correct: tuple[str, ...], incorrect: tuple[str, ...]) -> list[tuple[str, str]]:
    """Every correct answer with one incorrect answer of the same question: correct ``j`` with incorrect
    ``j mod len(incorrect)`` (each correct answer used once, the incorrect ones cycled in order)."""
    if not incorrect:
        return []
    return [(c, incorrect[j % len(incorrect)]) for j, c in enumerate(correct)]


def ab_pairs(items: list[tuple[int, str, str, str]], seed: int) -> list[ABPair]:
    """A/B pairs from ``(group, question, desirable answer, undesirable answer)`` items, the desirable answer at
    (A) or (B) by :func:`balanced_flips`."""
    pairs = []
    for (group, question, good, bad), flip in zip(items, balanced_flips(len(items), seed)):
        a, b = (bad, good) if flip else (good, bad)
        pairs.append(ABPair(group, ab_prompt(question, a, b), LETTERS[int(flip)]))
    return pairs


def mean_pair_difference(positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
    """CAA's vector: the mean over pairs of ``positive[i] − negative[i]`` (``[N, ...] → [...]``, float32)."""
    if positive.shape != negative.shape or positive.shape[0] == 0:
        raise ValueError(f"need matching, non-empty pair activations, got {tuple(positive.shape)} and "
                         f"{tuple(negative.shape)}")
    return (positive.double() - negative.double()).mean(0).float()
