"""Batched log-probability of answer spans given a context, every shared token computed once.

Every TruthfulQA MC text starts with the same instruction and primer, the answers of one question share the
question, and many answers share their first tokens ("No, ", "The "). With ``prefix_cache=True``:

1. the longest token prefix shared by all texts is run once and attended by every later pass through
   :func:`bench.attention.prefix_attention` (held once; on a model whose attention cannot, copied into every
   row's cache);
2. each context (the tokens before an answer) is one row together with the trie of its answers: its tokens after
   the shared prefix, then one node per distinct answer-token prefix, each node attending to the context and its
   own ancestors only (a 4-D attention mask) at its true position. A node's logits predict the next token of
   every answer through it, so each answer's log-probs are those a plain pass over ``context + answer``
   computes, up to float summation order (tested).

Without the cache every text is run whole (the reference path). Where the 4-D mask cannot be used (a text beyond a
sliding window, an attention that takes no custom mask such as flash attention) and on the earlier code path
(``RunConfig.legacy_paths``), contexts are scored one by one on the shared prefix's cache
(:mod:`bench.earlier`). Answer spans come from the tokenizer's character offsets.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch

from bench.attention import NAME, prefix_attention, supports_prefix
from bench.decoding import cache_kwarg, run_prefix, sliding_window
from bench.models import LoadedModel, head_at
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


def score_rows(model, cache_kwarg: str, rows: list[Encoded], starts: list[int], cache, past: int, pad: int,
                intervention, lm, device, edit_offset: int = 0) -> list[float]:
    """Answer log-prob sums for ``rows``, right-padded into one batch. Row ``b`` runs its tokens from
    ``starts[b]`` on (at their true positions) on top of a cache of ``past`` slots (``cache``: one row per batch
    row, or None with ``past == 0``) whose first ``starts[b]`` slots are its context; the other slots are masked.
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
        attn[b, :g] = 1
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
    """One row: a context's tokens after the shared prefix but its last one (the chain), then the trie of its
    answers' tokens from that last context token (the one predicting the first answer token) on: a token that
    continues the same tokens as an earlier answer's is that answer's node. ``parent`` indexes the row (-1: the
    first token, which sees only the shared prefix)."""

    ids: list[int]
    parent: list[int]
    pos: list[int]  # true positions
    edit: list[bool]  # where the intervention acts
    paths: list[tuple[int, list[int], list[int]]]  # (sequence index, the nodes predicting its answer, those tokens)


def _tree(seqs: list[Encoded], idx: list[int], context: tuple[int, ...], p: int, edit_offset: int) -> _Tree:
    """The row of sequences ``idx``, which share ``context`` after the first ``p`` tokens."""
    n = len(context)
    t = _Tree(list(context), list(range(-1, n - 1)), list(range(p, p + n)), [False] * n, [])
    nodes: dict[tuple[int, int], int] = {}  # (parent, token) -> node
    for i in idx:
        s, node, at = seqs[i], n - 1, {}
        edited = set(s.answer[edit_offset:])
        for j in range(s.answer[0] - 1, s.answer[-1]):  # the last answer token is predicted, never fed
            key = (node, s.ids[j])
            if key not in nodes:
                nodes[key] = len(t.ids)
                t.ids.append(s.ids[j])
                t.parent.append(node)
                t.pos.append(j)
                t.edit.append(j in edited)
            node = at[j] = nodes[key]
        t.paths.append((i, [at[a - 1] for a in s.answer], [s.ids[a] for a in s.answer]))
    return t


def by_context(seqs: list[Encoded], start: int = 0) -> dict[tuple[int, ...], list[int]]:
    """The sequences' indices grouped by context (every token before an answer's predicting one), keyed by the
    context's tokens from ``start`` on."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, s in enumerate(seqs):
        groups.setdefault(tuple(s.ids[start : s.answer[0] - 1]), []).append(i)
    return groups


def _trees(seqs: list[Encoded], p: int, edit_offset: int, most: int) -> list[_Tree]:
    """The rows of all contexts (the first ``p`` tokens shared by all), at most ``most`` answers each: a context
    with more answers gets several rows."""
    return [_tree(seqs, idx[k : k + most], context, p, edit_offset)
            for context, idx in by_context(seqs, p).items() for k in range(0, len(idx), most)]


def _batches(trees: list[_Tree], batch_size: int) -> list[list[_Tree]]:
    """Rows sorted by length, packed up to ``batch_size`` answers per forward pass."""
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


def _mask_dtype(model: torch.nn.Module) -> torch.dtype | None:
    """What a custom 4-D attention mask must be for ``model``'s attention: boolean for SDPA, additive in the
    model's dtype for eager attention, None for one that takes no custom mask (flash attention)."""
    impl = getattr(model.config, "_attn_implementation", None)
    if impl == "eager":
        return next(model.parameters()).dtype
    return torch.bool if impl in ("sdpa", NAME) else None


def cache_copy(cache):
    """A copy of a KV cache whose row operations (``batch_repeat_interleave``, ``batch_select_indices``) and
    updates leave ``cache`` unchanged: they replace its layers' tensors, which the copy shares, and never write
    them in place (the cache classes without ``layers`` are deep-copied)."""
    if not hasattr(cache, "layers"):
        return copy.deepcopy(cache)
    out = copy.copy(cache)
    out.layers = [copy.copy(layer) for layer in cache.layers]
    return out


def _layout(batch: list[_Tree], held: int) -> dict[str, torch.Tensor]:
    """The batch's inputs: ids, positions, edit positions and visibility ``[rows, 1, width, held + width]``, each
    row from column 0 on, right-padded to the longest. A padding slot sees itself only (no query sees nothing)."""
    width = max(len(t.ids) for t in batch)
    rows = len(batch)
    ids = torch.zeros(rows, width, dtype=torch.long)
    pos = torch.zeros(rows, width, dtype=torch.long)
    edit = torch.zeros(rows, width, dtype=torch.bool)
    visible = torch.zeros(rows, 1, width, held + width, dtype=torch.bool)
    visible[..., :held] = True
    visible[:, 0, :, held:] = torch.eye(width, dtype=torch.bool)
    for b, t in enumerate(batch):
        n = len(t.ids)
        ids[b, :n] = torch.tensor(t.ids)
        pos[b, :n] = torch.tensor(t.pos)
        edit[b, :n] = torch.tensor(t.edit)
        visible[b, 0, :n, held : held + n] = _visible(t)
    return {"ids": ids, "pos": pos, "edit": edit, "visible": visible}


def _logit_nodes(batch: list[_Tree]) -> tuple[torch.Tensor, torch.Tensor, dict[tuple[int, int], int]]:
    """The (row, node) pairs whose logits some answer needs (no node of a row's chain, no padding slot), and where
    each pair's logits land in the gathered output."""
    pairs = sorted({(b, node) for b, t in enumerate(batch) for _, path, _ in t.paths for node in path})
    rows, cols = torch.tensor(pairs, dtype=torch.long).reshape(-1, 2).T
    return rows, cols, {pair: k for k, pair in enumerate(pairs)}


def _score_trees(lm: LoadedModel, batch: list[_Tree], base, held: int, intervention) -> dict[int, float]:
    """Every answer's log-prob sum over one batch of rows, in one forward pass; the output embedding runs on the
    nodes that predict an answer token only (:func:`bench.models.head_at`). ``base``: the shared prefix's cache,
    copied into every row (``held`` of its slots then precede each row's own), or None (held through
    :func:`prefix_attention`, or no shared prefix)."""
    model = lm.model
    device = next(model.parameters()).device
    x = _layout(batch, held)
    dtype = _mask_dtype(model)
    mask = x["visible"] if dtype == torch.bool else torch.zeros(x["visible"].shape, dtype=dtype).masked_fill(
        ~x["visible"], torch.finfo(dtype).min)
    kwargs = dict(input_ids=x["ids"].to(device), attention_mask=mask.to(device), position_ids=x["pos"].to(device),
                  logits_to_keep=0, use_cache=base is not None)
    if base is not None:
        kwargs[cache_kwarg(model)] = rows = cache_copy(base)
        rows.batch_repeat_interleave(len(batch))
    at_rows, at_cols, where = _logit_nodes(batch)
    with contextlib.ExitStack() as stack:
        stack.enter_context(head_at(model, at_rows, at_cols))  # on the hidden states' device
        if intervention is not None:
            stack.enter_context(intervention.applied(lm, x["edit"].to(device)))
        logits = model(**kwargs).logits[0]
    logp = torch.log_softmax(logits.float(), dim=-1)
    answers = [(i, [where[b, node] for node in path], tokens)
               for b, t in enumerate(batch) for i, path, tokens in t.paths]
    sums = torch.stack([logp[torch.tensor(k), torch.tensor(tokens)].sum() for _, k, tokens in answers])
    return dict(zip((i for i, _, _ in answers), sums.tolist()))


def _plain(lm: LoadedModel, seqs: list[Encoded], intervention, batch_size: int, edit_offset: int,
           advance: Callable[[int], None]) -> list[float]:
    """Every text run whole, batched by length (the reference path)."""
    device = next(lm.model.parameters()).device
    out = [0.0] * len(seqs)
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i].ids))
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        values = score_rows(lm.model, "", [seqs[i] for i in idx], [0] * len(idx), None, 0, lm.tokenizer.pad_token_id,
                            intervention, lm, device, edit_offset)
        for i, v in zip(idx, values):
            out[i] = v
        advance(len(idx))
    return out


def tree_rows(lm: LoadedModel, seqs: list[Encoded]) -> bool:
    """Whether the scorer can run contexts and their answers' tries as rows of a custom 4-D mask: the model's
    attention takes one (SDPA or eager), it has an output embedding to read only the answer-predicting nodes
    (:func:`bench.models.head_at`) and no text outgrows a sliding window (one mask then serves sliding and full
    layers alike)."""
    window = sliding_window(lm.model)
    return (_mask_dtype(lm.model) is not None and lm.model.get_output_embeddings() is not None
            and (window is None or max(len(s.ids) for s in seqs) <= window))


@torch.no_grad()
def answer_logprobs(lm: LoadedModel, seqs: list[Encoded], intervention=None, batch_size: int = 16,
                    prefix_cache: bool = True, progress: str | None = None, edit_offset: int = 0) -> list[float]:
    """Sum of the answer tokens' log-probs for each sequence; ``intervention`` edits the answer tokens.

    ``edit_offset`` N leaves the first N answer tokens unedited as well, so the log-probs of the first N+1 answer
    tokens are the unintervened model's (with 0 only the first one's: it is predicted at the last context token).

    ``batch_size``: answers per forward pass (a context with more answers is split over several rows; without
    the cache, texts per forward pass). An intervention whose ``position_policy`` is ``"all"`` (a weight-like
    edit, e.g. LoFiT) also edits the shared prefix and the contexts, so the cached path equals the plain one for
    every policy. Where :func:`tree_rows` says no, and on the earlier code path, contexts are scored one by one
    (:func:`bench.earlier.score_by_context`).
    """
    model = lm.model
    if not seqs:
        return []
    with progress_bar(progress, len(seqs)) as advance:
        if not prefix_cache:
            return _plain(lm, seqs, intervention, batch_size, edit_offset, advance)
        if lm.earlier_paths or not tree_rows(lm, seqs):
            from bench.earlier import score_by_context  # which builds on this module

            return score_by_context(lm, seqs, intervention, batch_size, edit_offset, advance)
        p, shared, base = common_prefix(seqs), contextlib.nullcontext(), None
        if p > 0:  # the prefix shared by all texts, run once (a weight-like edit edits it too)
            base = run_prefix(lm, seqs[0].ids[:p], intervention)
            if supports_prefix(model):
                shared, base = prefix_attention(base, p), None  # attended once, not copied per row
        out = [0.0] * len(seqs)
        with shared:
            for batch in _batches(_trees(seqs, p, edit_offset, batch_size), batch_size):
                scores = _score_trees(lm, batch, base, p if base is not None else 0, intervention)
                for i, v in scores.items():
                    out[i] = v
                advance(len(scores))
    return out
