"""Nucleus sampling of continuations (the RealToxicityPrompts/DExperts protocol: 25 samples, 20 tokens, p = 0.9).

Two code paths draw the same samples. The default (:mod:`bench.decoding`) runs the token prefix shared by all
prompts once, prefills each prompt once per batch (its samples share that cache row) and decodes with continuous
batching: up to ``batch_size`` (prompt, sample) rows step together, finished rows leave and the next rows join.
``prefix_cache=False`` is the earlier path, HF ``generate(do_sample=True, top_p=p, top_k=0, temperature=1)`` on
left-padded batches of up to ``batch_size`` rows, kept to measure the speed-up and the equality of the samples.
Either way the intervention is active at the last position of every forward call (the last prompt token, then
every generated token: ITI/FLORAIN semantics, as in greedy TruthfulQA generation).

Reproducibility: the random numbers do not come from the global RNG. Each prompt gets a ``torch.Generator``
seeded from (``seed``, prompt index) that draws one uniform per (sample, step) up front, on the CPU; the token is
the one at that uniform's quantile of the nucleus distribution (inverse-CDF sampling, the same distribution as
``generate``'s multinomial draw; :func:`nucleus_quantile`, used by both paths). Samples of a prompt are therefore
the same whatever the path, the batch size, the prompts batched with it, the device's RNG or a resume that
restarts at that prompt (up to floating-point differences between differently batched logits).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from contextlib import nullcontext

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, TopPLogitsWarper

from bench.decoding import decode, eos_ids, fits_window, shared_prefix
from bench.models import LoadedModel
from bench.progress import progress_bar

#: ``on_prompt(index, samples)``: a prompt's samples are complete.
OnPrompt = Callable[[int, list[str]], None]


def prompt_generator(seed: int, index: int) -> torch.Generator:
    """The CPU generator of prompt ``index`` under run seed ``seed``."""
    digest = hashlib.sha256(f"toxicity-sampling:{seed}:{index}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def prompt_uniforms(seed: int, index: int, n_samples: int, max_new_tokens: int) -> torch.Tensor:
    """``[n_samples, max_new_tokens]`` uniforms in (0, 1] of one prompt."""
    return 1.0 - torch.rand((n_samples, max_new_tokens), generator=prompt_generator(seed, index), dtype=torch.float64)


def top_p_warper(top_p: float) -> TopPLogitsWarper | None:
    """The nucleus filter of ``top_p`` (``None`` when ``top_p`` is 1: nothing is filtered)."""
    return TopPLogitsWarper(top_p=top_p) if top_p < 1.0 else None


def nucleus_quantile(logits: torch.Tensor, uniforms: torch.Tensor, warper: TopPLogitsWarper | None,
                     input_ids: torch.Tensor | None = None) -> torch.Tensor:
    """``[n, 1]`` tokens: for each row of ``logits`` (``[n, vocab]`` float32), the token at quantile ``uniforms``
    (``[n]`` float64 in (0, 1]) of its top-p distribution (``input_ids`` only go to the warper, which ignores them)."""
    if warper is not None:
        logits = warper(input_ids, logits)
    cdf = torch.softmax(logits, dim=-1).double().cumsum(dim=-1)
    u = uniforms.to(cdf.device) * cdf[:, -1]
    return torch.searchsorted(cdf, u[:, None]).clamp_(max=cdf.shape[1] - 1)


class QuantileNucleusSampler(LogitsProcessor):
    """Picks each row's token by inverse-CDF sampling of the top-p distribution with a precomputed uniform,
    and returns scores that are 0 at that token and -inf elsewhere."""

    def __init__(self, uniforms: torch.Tensor, top_p: float, prompt_length: int) -> None:
        self.uniforms = uniforms  # [rows, steps]
        self.prompt_length = prompt_length
        self.top_p = top_p_warper(top_p)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        step = input_ids.shape[1] - self.prompt_length
        tokens = nucleus_quantile(scores.float(), self.uniforms[:, step], self.top_p, input_ids)
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(1, tokens, 0.0)


def _generation_config(lm: LoadedModel, max_new_tokens: int, top_p: float) -> GenerationConfig:
    """Pure nucleus sampling: neutral values for the settings a model's own generation config could impose."""
    base = lm.model.generation_config
    return GenerationConfig(do_sample=True, top_p=top_p, top_k=0, temperature=1.0, max_new_tokens=max_new_tokens,
                            repetition_penalty=1.0, no_repeat_ngram_size=0, pad_token_id=lm.tokenizer.pad_token_id,
                            eos_token_id=base.eos_token_id, bos_token_id=base.bos_token_id)


class _Collector:
    """The samples of every prompt; ``on_prompt`` is called as soon as a prompt's samples are all in."""

    def __init__(self, n_prompts: int, n_samples: int, indices: list[int], on_prompt: OnPrompt | None) -> None:
        self.out: list[list[str | None]] = [[None] * n_samples for _ in range(n_prompts)]
        self.remaining = [n_samples] * n_prompts
        self.indices, self.on_prompt = indices, on_prompt

    def add(self, p: int, j: int, text: str) -> None:
        """Sample ``j`` of prompt ``p`` is ``text``."""
        self.out[p][j] = text
        self.remaining[p] -= 1
        if self.remaining[p] == 0 and self.on_prompt is not None:
            self.on_prompt(self.indices[p], [s or "" for s in self.out[p]])

    def samples(self) -> list[list[str]]:
        return [[s or "" for s in samples] for samples in self.out]


@torch.no_grad()
def sample_continuations(lm: LoadedModel, prompts: Sequence[str], n_samples: int = 25, max_new_tokens: int = 20,
                         top_p: float = 0.9, seed: int = 0, batch_size: int = 50, intervention=None,
                         on_prompt: OnPrompt | None = None, indices: Sequence[int] | None = None,
                         progress: str | None = None, prefix_cache: bool = True) -> list[list[str]]:
    """``n_samples`` continuations of every prompt (decoded new tokens, special tokens skipped), in prompt order.

    ``indices``: each prompt's index in the full prompt list (default ``0..n-1``), which seeds its samples: to
    resume, pass the remaining prompts with their original indices. ``on_prompt(index, samples)`` is called as
    each prompt's samples are complete. ``batch_size`` counts sequences (rows), not prompts. ``progress``: the
    label of a progress bar over the samples (none when ``None``). ``prefix_cache=False``: the earlier path
    (left-padded HF ``generate``), same samples up to float differences.
    """
    if n_samples < 1 or max_new_tokens < 1 or batch_size < 1:
        raise ValueError("n_samples, max_new_tokens and batch_size must be >= 1")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must lie in (0, 1], got {top_p}")
    indices = list(range(len(prompts))) if indices is None else list(indices)
    if len(indices) != len(prompts):
        raise ValueError(f"{len(indices)} indices for {len(prompts)} prompts")
    uniforms = [prompt_uniforms(seed, indices[p], n_samples, max_new_tokens) for p in range(len(prompts))]
    rows = [(p, j) for p in range(len(prompts)) for j in range(n_samples)]
    collect = _Collector(len(prompts), n_samples, indices, on_prompt)
    with progress_bar(progress, len(rows)) as advance:
        if not (prefix_cache and rows and _sample_cached(lm, prompts, rows, uniforms, top_p, max_new_tokens,
                                                         batch_size, intervention, collect, advance)):
            _sample_plain(lm, prompts, rows, uniforms, top_p, max_new_tokens, batch_size, intervention, collect,
                          advance)
    return collect.samples()


def _sample_cached(lm: LoadedModel, prompts: Sequence[str], rows: list[tuple[int, int]], uniforms: list[torch.Tensor],
                   top_p: float, max_new_tokens: int, batch_size: int, intervention, collect: _Collector,
                   advance: Callable[[int], None]) -> bool:
    """Decode every (prompt, sample) row with :func:`bench.decoding.decode` (each prompt tokenised once, the shared
    prefix run once); ``False`` (nothing decoded) when the rows' padding would not fit the model's sliding window."""
    tok = lm.tokenizer
    ids = [tok(prompt)["input_ids"] for prompt in prompts]
    prefix = shared_prefix(lm, ids, intervention)
    if not fits_window(lm.model, prefix, ids, max_new_tokens):
        return False
    table = torch.cat(uniforms)  # row r = (p, j) is line p * n_samples + j, as ``rows`` is ordered
    warper = top_p_warper(top_p)

    def pick(logits: torch.Tensor, batch: list[int], steps: list[int]) -> torch.Tensor:
        return nucleus_quantile(logits, table[batch, steps], warper)[:, 0]

    def finished(r: int, tokens: list[int]) -> None:
        collect.add(*rows[r], tok.decode(tokens, skip_special_tokens=True))
        advance(1)

    decode(lm, [ids[p] for p, _ in rows], prefix, max_new_tokens, pick=pick, intervention=intervention, stop=(),
           eos=eos_ids(lm), batch_size=batch_size, on_row=finished)
    return True


def _sample_plain(lm: LoadedModel, prompts: Sequence[str], rows: list[tuple[int, int]], uniforms: list[torch.Tensor],
                  top_p: float, max_new_tokens: int, batch_size: int, intervention, collect: _Collector,
                  advance: Callable[[int], None]) -> None:
    """The earlier path: HF ``generate`` on left-padded batches of ``batch_size`` rows with a
    :class:`QuantileNucleusSampler`."""
    tok, model = lm.tokenizer, lm.model
    device = next(model.parameters()).device
    config = _generation_config(lm, max_new_tokens, top_p)
    side = tok.padding_side
    tok.padding_side = "left"
    try:
        for start in range(0, len(rows), batch_size):
            batch = rows[start : start + batch_size]
            enc = tok([prompts[p] for p, _ in batch], return_tensors="pt", padding=True).to(device)
            sampler = QuantileNucleusSampler(torch.stack([uniforms[p][j] for p, j in batch]), top_p,
                                             enc["input_ids"].shape[1])
            active = (intervention.applied(lm, "last") if intervention is not None and intervention.modules
                      else nullcontext())
            with active:
                seqs = model.generate(**enc, generation_config=config, logits_processor=LogitsProcessorList([sampler]))
            texts = tok.batch_decode(seqs[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            for (p, j), text in zip(batch, texts):
                collect.add(p, j, text)
            advance(len(batch))
    finally:
        tok.padding_side = side
