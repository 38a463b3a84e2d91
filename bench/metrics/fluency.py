"""Fluency of generated text: mean negative log-likelihood per token of a continuation given its prompt, under a
reference language model (the unintervened model for TruthfulQA answers, a separate model for toxicity samples).

Tokens as DExperts counts them: prompt + continuation tokenised together, the continuation being the tokens after
the first ``len(tokenize(prompt))``; scored with :func:`bench.scoring.answer_logprobs`, whose shared-prefix cache
runs a prompt shared by many texts (e.g. TruthfulQA's primer) once.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from bench.models import LoadedModel


@torch.no_grad()
def continuation_nll(lm: LoadedModel, prompts: Sequence[str], continuations: Sequence[str], batch_size: int = 16,
                     progress: str | None = None) -> list[float | None]:
    """Mean NLL (nats per token) of each continuation given its prompt (parallel lists); ``None`` for a
    continuation that is empty or adds no token. No intervention is applied: this is the reference model's view."""
    from bench.scoring import Encoded, answer_logprobs

    if len(prompts) != len(continuations):
        raise ValueError(f"{len(prompts)} prompts but {len(continuations)} continuations")
    tok = lm.tokenizer
    items, seqs = [], []  # (index, number of continuation tokens), Encoded
    prompt_tokens: dict[str, int] = {}
    for i, (prompt, cont) in enumerate(zip(prompts, continuations)):
        if prompt not in prompt_tokens:
            prompt_tokens[prompt] = len(tok(prompt)["input_ids"])
        n_prompt = prompt_tokens[prompt]
        full = tok(prompt + cont)["input_ids"]
        if not cont or len(full) <= n_prompt or n_prompt == 0:
            continue
        items.append((i, len(full) - n_prompt))
        seqs.append(Encoded(full, list(range(n_prompt, len(full)))))
    values: list[float | None] = [None] * len(prompts)
    for (i, n), total in zip(items, answer_logprobs(lm, seqs, batch_size=batch_size, progress=progress)):
        values[i] = -total / n
    return values
