"""Nucleus sampling of continuations (the RealToxicityPrompts/DExperts protocol: 25 samples, 20 tokens, p = 0.9).

Runs HF ``generate(do_sample=True, top_p=p, top_k=0, temperature=1)`` on left-padded batches of up to
``batch_size`` sequences (several prompts per batch, or one prompt's samples split over batches), with the
intervention active at the last position of every forward call (ITI/FLORAIN semantics, as in greedy
TruthfulQA generation).

Reproducibility: the random numbers do not come from the global RNG. Each prompt gets a ``torch.Generator``
seeded from (``seed``, prompt index) that draws one uniform per (sample, step) up front, on the CPU; a logits
processor turns the nucleus distribution into the token at that uniform's quantile (inverse-CDF sampling, the
same distribution as ``generate``'s multinomial draw), leaving ``generate`` a one-point distribution. Samples of
a prompt are therefore the same whatever the batch size, the prompts batched with it, the device's RNG or a
resume that restarts at that prompt (up to floating-point differences between padded and unpadded logits).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from contextlib import nullcontext

import torch
from rich.progress import Progress
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, TopPLogitsWarper

from bench.models import LoadedModel


def prompt_generator(seed: int, index: int) -> torch.Generator:
    """The CPU generator of prompt ``index`` under run seed ``seed``."""
    digest = hashlib.sha256(f"toxicity-sampling:{seed}:{index}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def prompt_uniforms(seed: int, index: int, n_samples: int, max_new_tokens: int) -> torch.Tensor:
    """``[n_samples, max_new_tokens]`` uniforms in (0, 1] of one prompt."""
    return 1.0 - torch.rand((n_samples, max_new_tokens), generator=prompt_generator(seed, index), dtype=torch.float64)


class QuantileNucleusSampler(LogitsProcessor):
    """Picks each row's token by inverse-CDF sampling of the top-p distribution with a precomputed uniform,
    and returns scores that are 0 at that token and -inf elsewhere."""

    def __init__(self, uniforms: torch.Tensor, top_p: float, prompt_length: int) -> None:
        self.uniforms = uniforms  # [rows, steps]
        self.prompt_length = prompt_length
        self.top_p = TopPLogitsWarper(top_p=top_p) if top_p < 1.0 else None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        step = input_ids.shape[1] - self.prompt_length
        logits = scores.float()
        if self.top_p is not None:
            logits = self.top_p(input_ids, logits)
        cdf = torch.softmax(logits, dim=-1).double().cumsum(dim=-1)
        u = self.uniforms[:, step].to(cdf.device) * cdf[:, -1]
        tokens = torch.searchsorted(cdf, u[:, None]).clamp_(max=cdf.shape[1] - 1)
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(1, tokens, 0.0)


def _generation_config(lm: LoadedModel, max_new_tokens: int, top_p: float) -> GenerationConfig:
    """Pure nucleus sampling: neutral values for the settings a model's own generation config could impose."""
    base = lm.model.generation_config
    return GenerationConfig(do_sample=True, top_p=top_p, top_k=0, temperature=1.0, max_new_tokens=max_new_tokens,
                            repetition_penalty=1.0, no_repeat_ngram_size=0, pad_token_id=lm.tokenizer.pad_token_id,
                            eos_token_id=base.eos_token_id, bos_token_id=base.bos_token_id)


@torch.no_grad()
def sample_continuations(lm: LoadedModel, prompts: Sequence[str], n_samples: int = 25, max_new_tokens: int = 20,
                         top_p: float = 0.9, seed: int = 0, batch_size: int = 50, intervention=None,
                         on_prompt: Callable[[int, list[str]], None] | None = None,
                         indices: Sequence[int] | None = None, progress: str | None = None) -> list[list[str]]:
    """``n_samples`` continuations of every prompt (decoded new tokens, special tokens skipped), in prompt order.

    ``indices``: each prompt's index in the full prompt list (default ``0..n-1``), which seeds its samples: to
    resume, pass the remaining prompts with their original indices. ``on_prompt(index, samples)`` is called as
    each prompt's samples are complete. ``batch_size`` counts sequences (rows), not prompts. ``progress``: the
    label of a progress bar over the samples (none when ``None``).
    """
    if n_samples < 1 or max_new_tokens < 1 or batch_size < 1:
        raise ValueError("n_samples, max_new_tokens and batch_size must be >= 1")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must lie in (0, 1], got {top_p}")
    indices = list(range(len(prompts))) if indices is None else list(indices)
    if len(indices) != len(prompts):
        raise ValueError(f"{len(indices)} indices for {len(prompts)} prompts")
    tok, model = lm.tokenizer, lm.model
    device = next(model.parameters()).device
    config = _generation_config(lm, max_new_tokens, top_p)
    uniforms = {p: prompt_uniforms(seed, indices[p], n_samples, max_new_tokens) for p in range(len(prompts))}
    rows = [(p, j) for p in range(len(prompts)) for j in range(n_samples)]
    out: list[list[str | None]] = [[None] * n_samples for _ in prompts]
    remaining = [n_samples] * len(prompts)
    side = tok.padding_side
    tok.padding_side = "left"
    try:
        with Progress(transient=True, disable=progress is None) as bar:
            task = bar.add_task(progress or "", total=len(rows))
            for start in range(0, len(rows), batch_size):
                batch = rows[start : start + batch_size]
                enc = tok([prompts[p] for p, _ in batch], return_tensors="pt", padding=True).to(device)
                sampler = QuantileNucleusSampler(torch.stack([uniforms[p][j] for p, j in batch]), top_p,
                                                 enc["input_ids"].shape[1])
                active = (intervention.applied(lm, "last") if intervention is not None and intervention.modules
                          else nullcontext())
                with active:
                    seqs = model.generate(**enc, generation_config=config,
                                          logits_processor=LogitsProcessorList([sampler]))
                texts = tok.batch_decode(seqs[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
                for (p, j), text in zip(batch, texts):
                    out[p][j] = text
                    remaining[p] -= 1
                    if remaining[p] == 0 and on_prompt is not None:
                        on_prompt(indices[p], [s or "" for s in out[p]])
                bar.advance(task, len(batch))
    finally:
        tok.padding_side = side
    return [[s or "" for s in samples] for samples in out]
