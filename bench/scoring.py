"""Batched log-probability of answer spans given a context, every shared token computed once.

Every TruthfulQA MC text starts with the same instruction and primer, the answers of one question share the
question, and many answers share their first tokens ("No, ", "The "). With ``prefix_cache=True``:

1. the longest token prefix shared by all texts is run once and attended by every later pass through
   :func:`bench.attention.prefix_attention` (held once; on a model whose attention cannot, copied into every
   row's cache);
2. each context (the tokens before an answer's predicting position) is one row together with the trie of its
   answers: its tokens after the shared prefix, then one node per distinct answer-token prefix, each node
   attending to the context and its own ancestors only (a 4-D attention mask) at its true position. A node's
   logits predict the next token of every answer through it, so each answer's log-probs are those a plain pass
   over ``context + answer`` computes, up to float summation order (tested).

Without the cache every text is run whole (the reference path); so is a text beyond a sliding window, or a model
whose attention takes no custom mask (flash attention). The earlier code path (``RunConfig.legacy_paths``) scores
context by context (:mod:`bench.earlier`). Answer spans come from the tokenizer's character offsets.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import torch

from bench.attention import NAME, prefix_attention, supports_prefix
from bench.decoding import cache_kwarg, sliding_window
from bench.models import LoadedModel
from bench.progress import progress_bar


@dataclass(frozen=True)
class Encoded:
    ids: list[int]
    answer: list[int]  # token positions of the answer (every token overlapping the answer's characters)


def encode(lm: LoadedModel, text: str, answer_start: int) -> Encoded:
    """Tokenise ``text``; the answer is every token that ends after character ``answer_start``."""
    enc = lm.tokenizer(text, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    answer = [i for i, (s, e) in enumerate(offsets) if e > answer_start and e > s]
    if not answer or answer[0] == 0:
        raise ValueError(f"no scoreable answer tokens in {text[answer_start - 20:answer_start + 40]!r}")
    return Encoded(ids, answer)


def common_prefix(seqs: list[Encoded]) -> int:
    """Length of the token prefix shared by all sequences that ends before every answer's predicting position."""
    if not seqs:
        return 0
    first = seqs[0].ids
    n = min(min(s.answer[0] for s in seqs) - 1, min(len(s.ids) for s in seqs) - 1)
    for s in seqs[1:]:
        i = 0
        while i < n and s.ids[i] == first[i]:
            i += 1
        n = i
    return max(n, 0)


def _score_rows(model, cache_kwarg: str, rows: list[Encoded], starts: list[int], cache, past: int, pad: int,
                intervention, lm, device, edit_offset: int = 0, shared: int = 0) -> list[float]:
    """Answer log-prob sums for ``rows``, right-padded into one batch. Row ``b`` runs its tokens from
    ``starts[b]`` on (at their true positions) on top of a cache of ``past`` slots (``cache``: one row per batch
    row, or None with ``past == 0``) whose first ``starts[b] - shared`` slots are its own context (its first
    ``shared`` tokens are the prefix attended through :func:`prefix_attention`); the other slots are masked.
    Logits are computed from the first position that predicts an answer token. The intervention edits
    each row's answer tokens from index ``edit_offset`` on. A row stops before its last answer token: that token is
    predicted, and nothing is scored after it, so feeding it (as a plain forward pass would) is wasted work."""
    ends = [r.answer[-1] for r in rows]
    t = max(end - g for end, g in zip(ends, starts))
    ids = torch.full((len(rows), t), pad, dtype=torch.long)
    attn = torch.zeros(len(rows), past + t, dtype=torch.long)
    mask = torch.zeros(len(rows), t, dtype=torch.bool)  # where the intervention acts: the answer tokens (from the offset)
    pos = torch.zeros(len(rows), t, dtype=torch.long)
    for b, (r, g, end) in enumerate(zip(rows, starts, ends)):
        n = end - g
        ids[b, :n] = torch.tensor(r.ids[g:end])
        attn[b, : g - shared] = 1
        attn[b, past : past + n] = 1
        mask[b, [a - g for a in r.answer[edit_offset:] if a < end]] = True
        pos[b] = g + torch.arange(t)
    lo = min(r.answer[0] - g for r, g in zip(rows, starts)) - 1  # logits from here: position lo + j predicts lo + j + 1
    kwargs = dict(input_ids=ids.to(device), attention_mask=attn.to(device), position_ids=pos.to(device),
                  logits_to_keep=torch.arange(lo, t, device=device), use_cache=cache is not None)
    if cache is not None:
        kwargs[cache_kwarg] = cache
    if intervention is not None:
        with intervention.applied(lm, positions=mask.to(device)):
            logits = model(**kwargs).logits
    else:
        logits = model(**kwargs).logits
    logp = torch.log_softmax(logits.float(), dim=-1)
    out = []
    for b, (r, g) in enumerate(zip(rows, starts)):
        where = torch.tensor(r.answer) - g - lo - 1
        tok = torch.tensor([r.ids[a] for a in r.answer])
        out.append(float(logp[b, where, tok].sum()))
    return out


@dataclass
class _Tree:
    """One row: a context's tokens after the shared prefix, then the trie of its answers' tokens from the
    context's last token on (an answer token that continues the same tokens as an earlier answer's is that
    answer's node). ``parent`` indexes the row (-1: the first token, which sees only the shared prefix)."""

    ids: list[int]
    parent: list[int]
    pos: list[int]  # true positions
    edit: list[bool]  # where the intervention acts
    chain: int  # the context's tokens before its last one: the nodes whose logits no answer needs
    paths: list[tuple[int, list[int], list[int]]]  # (sequence index, the nodes predicting its answer, those tokens)


def _trees(seqs: list[Encoded], p: int, edit_offset: int) -> list[_Tree]:
    """The rows of all contexts, in the order of their first sequence; the first ``p`` tokens are shared."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, s in enumerate(seqs):
        groups.setdefault(tuple(s.ids[p : s.answer[0] - 1]), []).append(i)
    trees = []
    for context, idx in groups.items():
        n = len(context)
        t = _Tree(list(context), list(range(-1, n - 1)), list(range(p, p + n)), [False] * n, n, [])
        nodes: dict[tuple[int, int], int] = {}  # (parent, token) -> node
        for i in idx:
            s, node, path = seqs[i], n - 1, []
            edited = set(s.answer[edit_offset:])
            for j in range(s.answer[0] - 1, s.answer[-1]):  # the last answer token is predicted, never fed
                key = (node, s.ids[j])
                if key not in nodes:
                    nodes[key] = len(t.ids)
                    t.ids.append(s.ids[j])
                    t.parent.append(node)
                    t.pos.append(j)
                    t.edit.append(j in edited)
                node = nodes[key]
                path.append(node)
            t.paths.append((i, path, [s.ids[a] for a in s.answer]))
        trees.append(t)
    return trees


def _batches(trees: list[_Tree], batch_size: int) -> list[list[_Tree]]:
    """Rows sorted by length, packed up to ``batch_size`` answers per forward pass (a row with more goes alone)."""
    out: list[list[_Tree]] = []
    answers = 0
    for t in sorted(trees, key=lambda t: len(t.ids)):
        if not out or answers + len(t.paths) > batch_size:
            out.append([])
            answers = 0
        out[-1].append(t)
        answers += len(t.paths)
    return out


def _visible(t: _Tree) -> torch.Tensor:
    """``[n, n]``: node ``i`` sees node ``j`` iff ``j`` is ``i`` or one of its ancestors."""
    vis = torch.zeros(len(t.ids), len(t.ids), dtype=torch.bool)
    for k, parent in enumerate(t.parent):
        if parent >= 0:
            vis[k] = vis[parent]
        vis[k, k] = True
    return vis


def _mask_dtype(model) -> torch.dtype | None:
    """What a custom 4-D attention mask must be for ``model``'s attention: boolean for SDPA, additive in the
    model's dtype for eager attention, None for one that takes no custom mask."""
    impl = getattr(model.config, "_attn_implementation", None)
    if impl == "eager":
        return next(model.parameters()).dtype
    return torch.bool if impl in ("sdpa", NAME) else None


def _score_trees(model, kwarg: str, batch: list[_Tree], held: int, base, pad: int, intervention, lm, device
                 ) -> dict[int, float]:
    """Every answer's log-prob sum over one batch of rows. Row ``b`` is shifted right so that every row's last
    context token sits in one column; ``base`` (or None: held through :func:`prefix_attention`) is the shared
    prefix's cache, copied into every row when given (``held`` of its slots are then in each row's cache)."""
    c = max(t.chain for t in batch)
    width = c + max(len(t.ids) - t.chain for t in batch)
    ids = torch.full((len(batch), width), pad, dtype=torch.long)
    pos = torch.zeros(len(batch), width, dtype=torch.long)
    edit = torch.zeros(len(batch), width, dtype=torch.bool)
    visible = torch.zeros(len(batch), 1, width, held + width, dtype=torch.bool)
    visible[..., :held] = True
    visible[:, 0, :, held:] = torch.eye(width, dtype=torch.bool)  # a padding slot sees itself only
    for b, t in enumerate(batch):
        off, n = c - t.chain, len(t.ids)
        ids[b, off : off + n] = torch.tensor(t.ids)
        pos[b, off : off + n] = torch.tensor(t.pos)
        edit[b, off : off + n] = torch.tensor(t.edit)
        visible[b, 0, off : off + n, held + off : held + off + n] = _visible(t)
    dtype = _mask_dtype(model)
    mask = visible if dtype == torch.bool else torch.zeros(visible.shape, dtype=dtype).masked_fill(
        ~visible, torch.finfo(dtype).min)
    kwargs = dict(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=pos.to(device),
                  logits_to_keep=torch.arange(c, width, device=device), use_cache=base is not None)
    if base is not None:
        kwargs[kwarg] = copy.deepcopy(base)
        kwargs[kwarg].batch_repeat_interleave(len(batch))
    with intervention.applied(lm, positions=edit.to(device)) if intervention is not None else contextlib.nullcontext():
        logits = model(**kwargs).logits
    logp = torch.log_softmax(logits.float(), dim=-1)
    return {i: float(logp[b, torch.tensor(path) - t.chain, torch.tensor(tokens)].sum())
            for b, t in enumerate(batch) for i, path, tokens in t.paths}


def _plain(model, seqs: list[Encoded], intervention, lm, batch_size: int, device, edit_offset: int, advance
           ) -> list[float]:
    """Every text run whole, batched by length (the reference path)."""
    out = [0.0] * len(seqs)
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i].ids))
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        values = _score_rows(model, "", [seqs[i] for i in idx], [0] * len(idx), None, 0, lm.tokenizer.pad_token_id,
                             intervention, lm, device, edit_offset)
        for i, v in zip(idx, values):
            out[i] = v
        advance(len(idx))
    return out


def _prefix_cache(lm: LoadedModel, ids: list[int], intervention):
    """The KV cache (batch 1) of the shared prefix ``ids``, edited only by a weight-like intervention
    (``position_policy == "all"``)."""
    edits_all = intervention is not None and getattr(intervention, "position_policy", "task") == "all"
    device = next(lm.model.parameters()).device
    with intervention.applied(lm, positions="all") if edits_all else contextlib.nullcontext():
        out = lm.model(input_ids=torch.tensor([ids], device=device), use_cache=True, logits_to_keep=1)
    return getattr(out, "cache", None) or out.past_key_values


@torch.no_grad()
def answer_logprobs(lm: LoadedModel, seqs: list[Encoded], intervention=None, batch_size: int = 16,
                    prefix_cache: bool = True, progress: str | None = None, edit_offset: int = 0) -> list[float]:
    """Sum of the answer tokens' log-probs for each sequence; ``intervention`` edits the answer tokens.

    ``edit_offset`` N leaves the first N answer tokens unedited as well, so the log-probs of the first N+1 answer
    tokens are the unintervened model's (with 0 only the first one's: it is predicted at the last context token).

    ``batch_size``: answers per forward pass (a context's answers share one row and are never split; without
    the cache, texts per forward pass). An intervention whose ``position_policy`` is ``"all"`` (a weight-like
    edit, e.g. LoFiT) also edits the shared prefix and the contexts, so the cached path equals the plain one for
    every policy.
    """
    model = lm.model
    device = next(model.parameters()).device
    window, longest = sliding_window(model), max((len(s.ids) for s in seqs), default=0)
    fits = window is None or longest <= window  # one mask serves sliding and full layers alike
    with progress_bar(progress, len(seqs)) as advance:
        if prefix_cache and lm.earlier_paths:
            from bench.earlier import score_by_context

            return score_by_context(lm, seqs, intervention, batch_size, edit_offset, advance)
        if not prefix_cache or not fits or _mask_dtype(model) is None:
            return _plain(model, seqs, intervention, lm, batch_size, device, edit_offset, advance)
        p, shared, base = common_prefix(seqs), contextlib.nullcontext(), None
        if p > 0:  # the prefix shared by all texts, run once (a weight-like edit edits it too)
            base = _prefix_cache(lm, seqs[0].ids[:p], intervention)
            if supports_prefix(model):
                shared, base = prefix_attention(base, p), None  # attended once, not copied per row
        out = [0.0] * len(seqs)
        with shared:
            for batch in _batches(_trees(seqs, p, edit_offset), batch_size):
                scores = _score_trees(model, cache_kwarg(model), batch, p if base is not None else 0, base,
                                      lm.tokenizer.pad_token_id, intervention, lm, device)
                for i, v in scores.items():
                    out[i] = v
                advance(len(scores))
    return out
