"""The earlier code path's answer scorer and KL/CE statistics, kept for ``RunConfig.legacy_paths`` (the speed
benchmark runs the earlier and the current path side by side, :mod:`bench.perf`); the scorer also serves the
current path where the current one's custom attention mask cannot be used.

* :func:`score_by_context`: per context (the tokens before an answer's predicting position), the context's tokens
  after the shared prefix are run once, batched, and its answers are then scored in batches of rows that reuse
  that context's KV cache (:func:`bench.scoring.answer_logprobs` now runs a context and the trie of its answers
  as one row instead).
* :func:`kl_ce_batch`: a batch's statistics over its whole ``[batch, length, vocabulary]`` logits at once
  (:func:`bench.tasks.kl_ce.kl_ce` now works through a window's positions in chunks).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn.functional as F

from bench.decoding import cache_kwarg, edits_everywhere, run_prefix, sliding_window
from bench.scoring import Encoded, by_context, cache_copy, common_prefix, score_rows

#: Contexts are extended together in chunks of up to this many batches' worth of answers; the chunk's answers are
#: then sorted by length into batches, which cuts padding (measured on smollm2-135m, 50 questions: 21.4 s with
#: one batch per chunk, 17.0 s with 8).
CHUNK_BATCHES = 8


def _chunks(groups: list[tuple[int, list[int]]], p: int, batch_size: int, mix: bool) -> list[list[tuple[int, list[int]]]]:
    """Pack contexts (``(length, answer indices)``, sorted) into chunks of at most ``batch_size`` answers; a
    context with more answers is a chunk of its own. Contexts equal to the shared prefix are never mixed with
    longer ones (their extension row would be empty). ``mix=False``: one context per chunk."""
    out: list[list[tuple[int, list[int]]]] = []
    cur: list[tuple[int, list[int]]] = []
    n = 0
    for g, idx in groups:
        if cur and (not mix or n + len(idx) > batch_size or (cur[0][0] == p) != (g == p)):
            out.append(cur)
            cur, n = [], 0
        cur.append((g, idx))
        n += len(idx)
    if cur:
        out.append(cur)
    return out


def _score_chunk(model, cache_kwarg: str, seqs: list[Encoded], chunk: list[tuple[int, list[int]]], p: int, base,
                 pad: int, intervention, lm, prefix_ctx, batch_size: int, device, edit_offset: int = 0
                 ) -> dict[int, float]:
    """Score the answers of several contexts. Each context's tokens after the shared prefix are run once, batched
    (right-padded), the prefix copied from ``base`` (None: no shared prefix) into each context's cache row; each
    answer row then attends to its own context's cache row, with the padding slots masked and its true positions
    for RoPE."""
    lens = [g for g, _ in chunk]
    e = max(lens) - p  # extension width (0: every context is the shared prefix)
    q = len(chunk)
    held = p if base is not None else 0  # the prefix's slots in each row's own cache
    cache = None
    if base is not None:
        cache = cache_copy(base)
        cache.batch_repeat_interleave(q)
    if e > 0:
        ext = torch.full((q, e), pad, dtype=torch.long)
        attn = torch.zeros(q, held + e, dtype=torch.long)
        for j, (g, idx) in enumerate(chunk):
            ext[j, : g - p] = torch.tensor(seqs[idx[0]].ids[p:g])
            attn[j, : g - p + held] = 1
        kwargs = {cache_kwarg: cache} if cache is not None else {}
        with prefix_ctx():
            out = model(input_ids=ext.to(device), attention_mask=attn.to(device), use_cache=True, logits_to_keep=1,
                        position_ids=(p + torch.arange(e)).expand(q, e).to(device), **kwargs)
        cache = getattr(out, "cache", None) or out.past_key_values
    rows = sorted(((i, j) for j, (_, idx) in enumerate(chunk) for i in idx), key=lambda r: len(seqs[r[0]].ids) - lens[r[1]])
    scores: dict[int, float] = {}
    batches = [rows[s : s + batch_size] for s in range(0, len(rows), batch_size)]
    for batch in batches:
        rows_cache = None
        if cache is not None:
            rows_cache = cache_copy(cache)
            rows_cache.batch_select_indices(torch.tensor([j for _, j in batch], device=device))
        values = score_rows(model, cache_kwarg, [seqs[i] for i, _ in batch], [lens[j] for _, j in batch],
                            rows_cache, held + e, pad, intervention, lm, device, edit_offset)
        scores.update({i: v for (i, _), v in zip(batch, values)})
    return scores


def score_by_context(lm, seqs: list[Encoded], intervention, batch_size: int, edit_offset: int,
                     advance: Callable[[int], None]) -> list[float]:
    """Every answer's log-prob sum: the shared prefix run once and copied into every row's cache, then context by
    context (``batch_size``: answer rows per forward pass). Also the current path's scorer where the trees' 4-D
    mask cannot be used (:func:`bench.scoring.tree_rows`): flash attention, texts beyond a sliding window."""
    model, pad = lm.model, lm.tokenizer.pad_token_id
    device = next(model.parameters()).device
    kwarg = cache_kwarg(model)
    prefix_ctx = ((lambda: intervention.applied(lm, positions="all")) if edits_everywhere(intervention)
                  else contextlib.nullcontext)
    groups = sorted(((len(c), idx) for c, idx in by_context(seqs).items()),
                    key=lambda g: (g[0], max(len(seqs[i].ids) for i in g[1])))
    # padding slots between a context and its answers shift a sliding window's reach: mix contexts only when
    # every padded row fits in the window
    window, longest = sliding_window(model), max(len(s.ids) for s in seqs)
    mix = window is None or 2 * longest < window
    p = common_prefix(seqs)
    base = run_prefix(lm, seqs[0].ids[:p], intervention) if p > 0 else None
    out = [0.0] * len(seqs)
    for chunk in _chunks(groups, p, CHUNK_BATCHES * batch_size, mix):
        for i, v in _score_chunk(model, kwarg, seqs, chunk, p, base, pad, intervention, lm, prefix_ctx, batch_size,
                                 device, edit_offset).items():
            out[i] = v
        advance(sum(len(idx) for _, idx in chunk))
    return out


def kl_ce_batch(lm, ids: torch.Tensor, intervention) -> tuple[list[float], list[float]]:
    """Per-window CE (intervened) and mean per-position KL(original ‖ intervened) of one batch of windows."""
    base = F.log_softmax(lm.model(input_ids=ids).logits[:, :-1].float(), -1)
    on = intervention is not None and bool(intervention.modules)
    with intervention.applied(lm, "all") if on else contextlib.nullcontext():
        logp = F.log_softmax(lm.model(input_ids=ids).logits[:, :-1].float(), -1) if on else base
    target = ids[:, 1:]
    ce = (-logp.gather(-1, target[..., None])[..., 0]).mean(1).tolist()
    return ce, (base.exp() * (base - logp)).sum(-1).clamp_min(0).mean(1).tolist()
