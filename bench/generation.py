"""TruthfulQA generation: prompt presets, batched greedy decoding with the intervention active, answer cleaning.

Position semantics (ITI/FLORAIN): the edit applies at the last position of every forward call, i.e. with the
KV cache at the last prompt token and then at every generated token (prompt-only methods edit nothing).

Two code paths give the same answers: the default (:mod:`bench.decoding`) runs the prompts' shared prefix once per
call and drops finished rows; ``prefix_cache=False`` is the earlier path (HF ``generate`` on left-padded batches),
kept to measure the speed-up (``python -m bench.perf --parts protocol``) and the equality of the answers.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from bench.decoding import Prefix, decode, eos_ids, fits_window, shared_prefix
from bench.models import LoadedModel
from bench.progress import progress_bar
from bench.prompts import INSTRUCTION, QA_PRIMER

#: ITI's "informative" instruction: the default one without its last clause.
INFORMATIVE_INSTRUCTION = INSTRUCTION.split("; and reply")[0] + "."


@dataclass(frozen=True)
class GenPreset:
    """A generation prompt: ``template.format(question=..., fewshot=...)``; the model writes the answer after it."""

    name: str
    template: str
    description: str


GEN_PRESETS: dict[str, GenPreset] = {
    p.name: p for p in (
        GenPreset("iti", INSTRUCTION + "\n\n{fewshot}" + QA_PRIMER + "\n\nQ: {question}",
                  "ITI/FLORAIN: Ouyang et al. instruction + TruthfulQA QA primer + '\\n\\nQ: {q}'; the model "
                  "writes '\\nA: ...' itself"),
        GenPreset("iti-informative", INFORMATIVE_INSTRUCTION + "\n\n{fewshot}" + QA_PRIMER + "\n\nQ: {question}",
                  "ITI's --instruction_prompt informative: the instruction without the 'I have no comment' clause"),
        GenPreset("qa", "{fewshot}" + QA_PRIMER + "\n\nQ: {question}",
                  "TruthfulQA's qa preset without an instruction"),
        GenPreset("lm-eval", "{fewshot}" + QA_PRIMER + "\n\nQ: {question}\nA:",
                  "lm-eval truthfulqa_gen: QA primer + '\\n\\nQ: {q}\\nA:'"),
    )
}


def gen_prompt(question: str, preset: str = "iti", fewshot: str = "") -> str:
    if preset not in GEN_PRESETS:
        raise ValueError(f"unknown generation prompt preset {preset!r}; valid: {', '.join(GEN_PRESETS)}")
    return GEN_PRESETS[preset].template.format(question=question, fewshot=fewshot)


def answer_context(prompt: str, continuation: str) -> tuple[str, str]:
    """Split a generation into (context, answer): the continuation is cut at the next ``Q:`` and everything up to
    its first ``A:`` joins the prompt (ITI's rule), trailing whitespace dropped. The answer is what the judge reads
    (stripped, :func:`clean_answer`) and what the fluency part scores in its context."""
    text = continuation.split("Q:", 1)[0].rstrip()
    i = text.find("A:")
    return (prompt + text[: i + 2], text[i + 2:]) if i >= 0 else (prompt, text)


def clean_answer(text: str) -> str:
    """Cut a continuation at the next ``Q:``, keep what follows ``A:`` (ITI's rule), strip whitespace."""
    return answer_context("", text)[1].strip()


def _batches(items: Sequence, size: int) -> Iterator[Sequence]:
    for s in range(0, len(items), size):
        yield items[s : s + size]


@torch.no_grad()
def generate(lm: LoadedModel, prompts: Sequence[str], intervention=None, max_new_tokens: int = 50,
             batch_size: int = 16, stop: Iterable[str] = ("Q:",),
             on_batch: Callable[[list[int], list[str]], None] | None = None, skip: Collection[int] = (),
             progress: str | None = None, prefix_cache: bool = True) -> list[str]:
    """Greedy continuations of ``prompts``, with ``intervention`` at the last positions.

    ``stop`` strings end a sequence early (the text is cut at them anyway, so greedy output is unchanged).
    ``on_batch(indices, continuations)`` is called as each batch finishes (for incremental saving). Batches are
    fixed by the prompt lengths alone; a batch whose prompts are all in ``skip`` (done before an interruption) is
    not run, so a resumed run decodes exactly the batches an uninterrupted one would. ``prefix_cache=False``:
    the earlier path (left-padded HF ``generate``), same answers up to float ties.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be ≥ 1, got {max_new_tokens}")
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # similar lengths share a batch
    out: list[str | None] = [None] * len(prompts)
    if prefix_cache and len(skip) < len(prompts):
        ids = lm.tokenizer(list(prompts))["input_ids"]
        prefix = shared_prefix(lm, ids, intervention)
        if fits_window(lm.model, prefix, ids, max_new_tokens):
            _generate_cached(lm, ids, prefix, [i for i in order if i not in set(skip)], intervention,
                             max_new_tokens, batch_size, stop, on_batch, progress, out)
            return [o or "" for o in out]
    batches = [list(b) for b in _batches(order, batch_size) if not set(b) <= set(skip)]
    with progress_bar(progress, sum(len(b) for b in batches)) as advance:
        for idx in batches:
            _plain_batch(lm, prompts, idx, intervention, max_new_tokens, stop, out)
            if on_batch is not None:
                on_batch(idx, [out[i] or "" for i in idx])
            advance(len(idx))
    return [o or "" for o in out]


def _generate_cached(lm: LoadedModel, ids: list[list[int]], prefix: Prefix, rows: list[int], intervention,
                     max_new_tokens: int, batch_size: int, stop: Iterable[str],
                     on_batch: Callable[[list[int], list[str]], None] | None, progress: str | None,
                     out: list) -> None:
    """Decode ``rows`` on top of the shared prefix's cache (:func:`bench.decoding.decode`) into ``out``, handing
    finished answers to ``on_batch`` in groups of ``batch_size``."""
    ready: list[int] = []

    def flush() -> None:
        if on_batch is not None and ready:
            on_batch(list(ready), [out[i] for i in ready])
        ready.clear()

    with progress_bar(progress, len(rows)) as advance:
        def finished(j: int, tokens: list[int]) -> None:
            out[rows[j]] = lm.tokenizer.decode(tokens, skip_special_tokens=True)
            ready.append(rows[j])
            advance(1)
            if len(ready) >= batch_size:
                flush()

        decode(lm, [ids[i] for i in rows], prefix, max_new_tokens, intervention=intervention, stop=list(stop),
               eos=eos_ids(lm), batch_size=batch_size, on_row=finished)
    flush()


def _plain_batch(lm: LoadedModel, prompts: Sequence[str], idx: list[int], intervention, max_new_tokens: int,
                 stop: Iterable[str], out: list) -> None:
    """Decode one left-padded batch greedily with HF ``generate`` into ``out[i]`` for ``i`` in ``idx``."""
    tok, model = lm.tokenizer, lm.model
    side = tok.padding_side
    tok.padding_side = "left"
    try:
        enc = tok([prompts[i] for i in idx], return_tensors="pt", padding=True).to(next(model.parameters()).device)
    finally:
        tok.padding_side = side
    active = intervention.applied(lm, "last") if intervention is not None and intervention.modules else nullcontext()
    with active:
        seqs = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id,
                              stop_strings=list(stop) or None, tokenizer=tok, top_p=None, top_k=None,
                              temperature=None)
    for i, t in zip(idx, tok.batch_decode(seqs[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)):
        out[i] = t
