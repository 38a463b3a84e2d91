"""Batched decoding in which every shared token is computed once: the prefix shared by all prompts of a call
(TruthfulQA's instruction + primer) is run once and its KV cache reused by every batch; within a batch each
distinct prompt is prefilled once (a toxicity prompt's 25 samples share one prefill), and rows leave the batch as
soon as they finish (EOS or a stop string), so a batch costs the sum of its answers' lengths, not its longest.

The shared prefix's keys and values are held once and every row attends to them through
:func:`bench.attention.prefix_attention`; a batch row's own cache is ``[padding | the rest of its prompt |
generated tokens]``, the padding slots masked, and every token keeps its true position (``position_ids``), so a
row computes what it would alone, up to floating-point summation order (on a model whose attention cannot attend
to a held prefix, :func:`bench.attention.supports_prefix`, and on the earlier code path, each row's cache starts
with a copy of the prefix's). The intervention acts where the plain path's does: at the last position of every
forward call (the last prompt token, then every generated token); a weight-like edit (``position_policy ==
"all"``) also edits the shared prefix.

Only torch and transformers are needed (the GPU check runs this module on a bare machine).
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Collection, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch

from bench.attention import prefix_attention, supports_prefix

#: ``pick(logits, rows, steps)``: the next token of each row being decoded (``logits``: ``[n, vocab]`` float32 of
#: rows ``rows``; ``steps``: each row's index of the token being chosen).
Picker = Callable[[torch.Tensor, list[int], list[int]], torch.Tensor]


def greedy(logits: torch.Tensor, rows: list[int], steps: list[int]) -> torch.Tensor:
    """Greedy decoding: the most likely token (the first one on a tie, as ``argmax`` and ``generate`` do)."""
    return logits.argmax(-1)


@dataclass
class Prefix:
    """The KV cache of the ``length`` tokens every prompt of a call starts with (batch 1; ``None`` if none)."""

    length: int
    cache: object | None


def _edit(lm, intervention, positions) -> AbstractContextManager:
    if intervention is None or not intervention.modules:
        return nullcontext()
    return intervention.applied(lm, positions)


def _cache_of(out):
    return getattr(out, "cache", None) or out.past_key_values


def cache_kwarg(model) -> str:
    """The forward keyword of the KV cache (transformers ≥ 5.24 renamed ``past_key_values`` to ``cache``)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def sliding_window(model) -> int | None:
    cfg = model.config
    cfg = getattr(cfg, "text_config", None) or cfg
    return getattr(cfg, "sliding_window", None)


def common_length(seqs: Sequence[Sequence[int]]) -> int:
    """Length of the token prefix all ``seqs`` share, leaving each at least one token of its own (the last
    prompt token is where the intervention acts, so it is never in the shared part)."""
    if not seqs:
        return 0
    first, n = seqs[0], min(len(s) for s in seqs) - 1
    for s in seqs[1:]:
        i = 0
        while i < n and s[i] == first[i]:
            i += 1
        n = i
    return max(n, 0)


def edits_everywhere(intervention) -> bool:
    """Whether ``intervention`` edits every position (a weight-like edit, ``position_policy == "all"``): it then
    edits a shared prefix too."""
    return intervention is not None and getattr(intervention, "position_policy", "task") == "all"


@torch.no_grad()
def run_prefix(lm, ids: Sequence[int], intervention=None):
    """The KV cache (batch 1) of ``ids``, a prefix shared by many texts, edited only by an intervention that
    edits every position (:func:`edits_everywhere`)."""
    device = next(lm.model.parameters()).device
    with _edit(lm, intervention, "all") if edits_everywhere(intervention) else nullcontext():
        out = lm.model(input_ids=torch.tensor([list(ids)], device=device), use_cache=True, logits_to_keep=1)
    return _cache_of(out)


def shared_prefix(lm, seqs: Sequence[Sequence[int]], intervention=None) -> Prefix:
    """Run the prefix shared by all ``seqs`` once (:func:`run_prefix`)."""
    p = common_length(seqs)
    return Prefix(p, run_prefix(lm, seqs[0][:p], intervention) if p else None)


def fits_window(model, prefix: Prefix, seqs: Sequence[Sequence[int]], max_new_tokens: int) -> bool:
    """Whether every row, prefix and generated tokens included, stays within a sliding window's reach, padding
    slots in its cache counted (then a row sees all its tokens, as it would alone; always true without a window)."""
    window = sliding_window(model)
    width = max(len(s) for s in seqs) - prefix.length
    return window is None or prefix.length + 2 * width + max_new_tokens < window


#: Extra cache slots allocated per layer when a batch's cache is (re)built, so decoding steps write in place.
SLACK = 32


def _grow_update(layer, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
    """``DynamicLayer.update`` writing into a buffer with spare slots (a view of it is the layer's cache) instead
    of concatenating a new tensor every step; a layer whose tensors were replaced (rows selected) is re-buffered."""
    n, m = layer.keys.shape[-2], key_states.shape[-2]
    buf = getattr(layer, "_buffer", None)
    if buf is None or buf[0].data_ptr() != layer.keys.data_ptr() or buf[0].shape[0] != layer.keys.shape[0] \
            or buf[0].shape[-2] < n + m:
        buf = tuple(_padded(t, n + m + SLACK) for t in (layer.keys, layer.values))
        layer._buffer = buf
    buf[0][..., n:n + m, :] = key_states
    buf[1][..., n:n + m, :] = value_states
    layer.keys, layer.values = buf[0][..., :n + m, :], buf[1][..., :n + m, :]
    return layer.keys, layer.values


def _padded(t: torch.Tensor, width: int) -> torch.Tensor:
    """``t [b, h, w, d]`` at the start of a buffer of ``width`` slots (the rest is never read: uninitialised)."""
    out = t.new_empty(*t.shape[:2], width, t.shape[-1])
    out[..., : t.shape[-2], :] = t
    return out


def _layers(cache) -> list:
    layers = getattr(cache, "layers", None)
    if layers is None or any(not hasattr(layer, "keys") for layer in layers):
        raise NotImplementedError("continuous batching needs a transformers cache with per-layer keys/values")
    return layers


def _grow(cache) -> None:
    """Let the cache's plain (not sliding-window) layers write decoding steps into buffers (:func:`_grow_update`)."""
    for layer in getattr(cache, "layers", None) or []:
        if type(layer).__name__ == "DynamicLayer":
            layer.update = _grow_update.__get__(layer)


@dataclass
class _Batch:
    """The decoding state of the rows being decoded together."""

    rows: list[int]  # row ids
    cache: object
    attn: torch.Tensor  # [n, slots]
    pos: torch.Tensor  # [n] position of each row's next token
    logits: torch.Tensor  # [n, vocab] float32: each row's next-token logits

    def select(self, keep: list[int]) -> None:
        """Keep the rows at indices ``keep`` (of ``rows``)."""
        idx = torch.tensor(keep, device=self.attn.device)
        self.cache.batch_select_indices(idx)
        self.rows = [self.rows[i] for i in keep]
        self.attn, self.pos, self.logits = self.attn[idx], self.pos[idx], self.logits[idx]

    def join(self, other: _Batch) -> None:
        """Append ``other``'s rows; slots no row attends to any more are dropped, the narrower side is padded
        with masked slots, and each layer gets a buffer with spare slots for the next steps."""
        alive = self.attn.bool().any(0)
        width = max(int(alive.sum()), other.attn.shape[1])
        for mine, theirs in zip(_layers(self.cache), _layers(other.cache)):
            buffers = []
            for name in ("keys", "values"):
                a, b = getattr(mine, name)[..., alive, :], getattr(theirs, name)
                buf = a.new_zeros(a.shape[0] + b.shape[0], a.shape[1], width + SLACK, a.shape[-1])
                buf[: a.shape[0], :, : a.shape[-2]] = a
                buf[a.shape[0]:, :, : b.shape[-2]] = b
                setattr(mine, name, buf[..., :width, :])
                buffers.append(buf)
            mine._buffer = tuple(buffers)
        _grow(self.cache)
        pad = lambda m: torch.cat([m, m.new_zeros(m.shape[0], width - m.shape[1])], 1)  # noqa: E731
        self.attn = torch.cat([pad(self.attn[:, alive]), pad(other.attn)])
        self.rows, self.pos = self.rows + other.rows, torch.cat([self.pos, other.pos])
        self.logits = torch.cat([self.logits, other.logits])


def attends(lm, prefix: Prefix, seqs: Sequence[Sequence[int]], max_new_tokens: int) -> bool:
    """Whether rows attend to ``prefix`` held once (:func:`prefix_attention`) rather than each holding a copy: the
    model's attention can, and no row outgrows a sliding window (which would hide the prefix's start)."""
    return (prefix.cache is not None and supports_prefix(lm.model)
            and fits_window(lm.model, prefix, seqs, max_new_tokens))


def _prefill(lm, rows: list[int], seqs: Sequence[Sequence[int]], prefix: Prefix, pad: int, attend: bool) -> _Batch:
    """Prefill each distinct prompt of ``rows`` once (its tokens after the shared prefix, left-padded; the prefix
    attended through :func:`prefix_attention`, active around the call, when ``attend``, else copied into each
    row's cache first) and give every row its prompt's cache row and last-token logits."""
    model, p = lm.model, prefix.length
    held = 0 if attend else p  # the prefix's slots in each row's own cache
    device = next(model.parameters()).device
    distinct: dict[tuple[int, ...], int] = {}
    source = [distinct.setdefault(tuple(seqs[r][p:]), len(distinct)) for r in rows]
    suffixes = list(distinct)
    w = max(len(s) for s in suffixes)
    ids = torch.full((len(suffixes), w), pad, dtype=torch.long)
    attn = torch.zeros(len(suffixes), held + w, dtype=torch.long)
    pos = torch.zeros(len(suffixes), w, dtype=torch.long)
    for j, s in enumerate(suffixes):
        ids[j, w - len(s):] = torch.tensor(s)
        attn[j, :held] = 1
        attn[j, held + w - len(s):] = 1
        pos[j, w - len(s):] = p + torch.arange(len(s))
    kwargs = {}
    if held:
        cache = copy.deepcopy(prefix.cache)
        cache.batch_repeat_interleave(len(suffixes))
        kwargs[cache_kwarg(model)] = cache
    out = model(input_ids=ids.to(device), attention_mask=attn.to(device), position_ids=pos.to(device),
                use_cache=True, logits_to_keep=1, **kwargs)
    state = _Batch(list(range(len(suffixes))), _cache_of(out), attn.to(device),
                   torch.tensor([p + len(s) for s in suffixes], device=device), out.logits[:, -1].float())
    if source != state.rows:
        state.select(source)
    state.rows = list(rows)
    _grow(state.cache)
    return state


def _finished(tokens: list[int], eos: Collection[int], stop: Sequence[str], decode: Callable[[list[int]], str]) -> bool:
    return tokens[-1] in eos or (bool(stop) and any(s in decode(tokens) for s in stop))


def _step(model, kwarg: str, state: _Batch, tokens: torch.Tensor) -> None:
    """One decoding step of every row of ``state`` (``tokens``: each row's last chosen token)."""
    state.attn = torch.cat([state.attn, state.attn.new_ones(len(state.rows), 1)], 1)
    o = model(input_ids=tokens[:, None], attention_mask=state.attn, position_ids=state.pos[:, None], use_cache=True,
              **{kwarg: state.cache})
    state.cache, state.pos, state.logits = _cache_of(o), state.pos + 1, o.logits[:, -1].float()


@torch.no_grad()
def decode(lm, seqs: Sequence[Sequence[int]], prefix: Prefix, max_new_tokens: int, pick: Picker = greedy,
           intervention=None, stop: Sequence[str] = (), eos: Collection[int] = (), batch_size: int = 32,
           on_row: Callable[[int, list[int]], None] | None = None) -> list[list[int]]:
    """The new tokens of every row (``seqs``: the rows' prompt token ids, each starting with the prefix's tokens),
    decoded in order with continuous batching: up to ``batch_size`` rows step together; when half of them have
    finished, the next rows are prefilled and join (for a model with a sliding window: when all have finished). A row ends at a token in ``eos`` (kept, as ``generate`` keeps
    it), once its decoded text contains a ``stop`` string, or after ``max_new_tokens``; ``on_row(row, tokens)``
    is called as each row ends. A row's tokens do not depend on the rows decoded beside it (up to float order)."""
    model, tok = lm.model, lm.tokenizer
    if prefix.length and any(len(s) <= prefix.length for s in seqs):
        raise ValueError("every row needs at least one prompt token after the shared prefix")
    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError(f"max_new_tokens and batch_size must be ≥ 1, got {max_new_tokens} and {batch_size}")
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    out: list[list[int]] = [[] for _ in seqs]
    pending, kwarg, state = list(range(len(seqs)))[::-1], cache_kwarg(model), None
    done: set[int] = set()
    continuous = sliding_window(model) is None  # joined rows' slots must stay within a sliding window: not mixed
    attend = attends(lm, prefix, seqs, max_new_tokens)
    shared = prefix_attention(prefix.cache, prefix.length) if attend else nullcontext()
    with _edit(lm, intervention, "last"), shared:
        while pending or state is not None:
            live = 0 if state is None else len(state.rows) - len(done & set(state.rows))
            if pending and (state is None or continuous and live <= batch_size // 2):
                new = _prefill(lm, [pending.pop() for _ in range(min(len(pending), batch_size - live))], seqs,
                               prefix, pad, attend)
                if state is not None:
                    state.select([i for i, r in enumerate(state.rows) if r not in done])
                    state.join(new)
                else:
                    state = new
            tokens = pick(state.logits, state.rows, [len(out[r]) for r in state.rows])
            for r, t in zip(state.rows, tokens.tolist()):
                if r not in done:
                    out[r].append(t)
                    if len(out[r]) >= max_new_tokens or _finished(out[r], eos, stop, tok.decode):
                        done.add(r)
                        if on_row is not None:
                            on_row(r, out[r])
            keep = [i for i, r in enumerate(state.rows) if r not in done]
            if not keep:
                state = None
                continue
            if 4 * (len(state.rows) - len(keep)) >= len(state.rows):  # finished rows stop costing compute
                state.select(keep)
                tokens = tokens[torch.tensor(keep, device=tokens.device)]
            _step(model, kwarg, state, tokens)
    return out


def eos_ids(lm) -> set[int]:
    """The token ids that end a sequence under the model's generation config (what ``generate`` stops at)."""
    eos = getattr(lm.model.generation_config, "eos_token_id", None)
    if eos is None:
        eos = lm.tokenizer.eos_token_id
    return set(eos if isinstance(eos, list | tuple) else [] if eos is None else [eos])
