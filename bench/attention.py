"""Attention that copies nothing it can share: grouped key/value heads on CPU, and a shared prompt prefix.

transformers' SDPA attention copies every key/value head once per query head of its group (``repeat_kv``) whenever
an attention mask is given and more than one token is fed, because CUDA's fast kernels refuse a mask with grouped
heads. On CPU torch computes grouped heads itself (``enable_gqa``) with a mask, and the copy is what costs: on
smollm2-135m (9 query heads over 3 key/value heads) the scorer's and the decoder's multi-token passes over a
cached context spent more time copying keys and values than attending. :func:`grouped_sdpa` is that attention
with the copy left out (for one query token transformers already avoids it and runs as it would); its outputs are
bit-identical to transformers' (tested).

Inside :func:`prefix_attention` every query also attends to the keys and values of a prefix that all rows share
(TruthfulQA's instruction and primer), held once (batch 1) instead of copied into every row's KV cache, so the rows'
caches, the copies that build them and the keys each decoding step reads shrink from prefix + own tokens to own
tokens. A one-token decoding step combines the two parts by their softmax normalisers, exactly as one softmax over
both (cascade attention, computed in float32: :func:`_cascade`). A pass of several tokens per row (scoring,
prefill) instead puts the prefix's keys and values ahead of each row's own for that one call and runs one fused
SDPA (:func:`_joined`): the transient copy (rows × prefix × key/value heads per layer) costs less than the
cascade's separate products there (1.5 against 2.5–4.0 ms per layer on the scorer's shapes, measured on
smollm2-135m's heads), and is never kept. Either way each row computes what it would with the prefix in its own
cache, up to float summation order (and, for a half-precision model, the rounding its own attention would do). It
is used on CPU, where it was measured; on a GPU the prefix is still copied into every row's cache
(:func:`supports_prefix`).

Only torch and transformers are needed (the GPU check imports this module on a bare machine).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

#: The attention implementation's registered name (``model.config._attn_implementation``).
NAME = "sdpa_grouped"
#: Attention arguments only transformers' own SDPA path handles (soft-capping, position biases, attention sinks).
_TRANSFORMERS_ONLY = ("softcap", "position_bias", "s_aux")


def grouped_sdpa(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                 is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention, except that a masked call on CPU with grouped key/value heads lets torch
    group the heads (``enable_gqa``) instead of copying keys and values per query head, and that inside
    :func:`prefix_attention` the queries also attend to the shared prefix (:func:`_joined` for several tokens per
    row, :func:`_cascade` for one; on any device).
    Everything else (no mask, one key/value head per query head, other devices, soft-capping, position biases)
    is transformers' own."""
    prefix = _PREFIX.get()
    if prefix is not None:
        if any(kwargs.get(k) is not None for k in _TRANSFORMERS_ONLY) or dropout \
                or (attention_mask is not None and attention_mask.dtype != torch.bool):
            raise NotImplementedError("prefix attention supports plain scaled dot-product attention with a boolean "
                                      "mask only (no soft-capping, position bias, attention sinks or dropout)")
        keys, values = prefix[module.layer_idx]
        attend = _joined if query.shape[2] > 1 else _cascade
        return attend(query, key, value, attention_mask, keys, values, scaling), None
    plain = (query.device.type != "cpu" or attention_mask is None or query.shape[2] == 1
             or getattr(module, "num_key_value_groups", 1) == 1
             or any(kwargs.get(k) is not None for k in _TRANSFORMERS_ONLY)
             or kwargs.get("output_attentions"))
    if plain:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout,
                                         scale=scaling, enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(NAME, grouped_sdpa)
AttentionMaskInterface.register(NAME, sdpa_mask)  # the masks SDPA takes


def use_grouped(model: torch.nn.Module) -> bool:
    """Switch a model that runs transformers' SDPA attention to :func:`grouped_sdpa`; False (unchanged) for a
    model with another implementation (eager, flash attention)."""
    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return False
    model.set_attn_implementation(NAME)
    return True


def use_plain(model: torch.nn.Module) -> None:
    """Undo :func:`use_grouped` (back to transformers' SDPA attention)."""
    if getattr(model.config, "_attn_implementation", None) == NAME:
        model.set_attn_implementation("sdpa")


#: Per layer, the shared prefix's ``(keys, values)`` ``[1, kv_heads, P, head_dim]`` (None: no prefix attention).
_PREFIX: ContextVar[list[tuple[torch.Tensor, torch.Tensor]] | None] = ContextVar("prefix", default=None)


def supports_prefix(model: torch.nn.Module) -> bool:
    """Whether :func:`prefix_attention` can act on ``model``: it runs :func:`grouped_sdpa` on CPU (where the
    cascade was measured) and its attention applies no soft-capping. Elsewhere the callers copy the prefix into
    every row's cache instead. (Written for Llama- and Gemma-3-style attention: one KV cache layer per layer.)"""
    cfg = getattr(model.config, "text_config", None) or model.config
    return (getattr(model.config, "_attn_implementation", None) == NAME
            and next(model.parameters()).device.type == "cpu"
            and getattr(cfg, "attn_logit_softcapping", None) is None)


def prefix_length() -> int:
    """Tokens of the prefix every query attends to now (0 outside :func:`prefix_attention`)."""
    layers = _PREFIX.get()
    return layers[0][0].shape[-2] if layers else 0


@contextmanager
def prefix_attention(cache, length: int) -> Iterator[None]:
    """Within the block, every query of :func:`grouped_sdpa` also attends to ``cache``'s keys and values (a
    transformers cache of batch 1 holding the ``length`` prefix tokens, which come before every row's own, whose
    positions must count them). The rows' own caches and attention masks then cover their own tokens only."""
    layers = [(layer.keys, layer.values) for layer in cache.layers]
    if any(k.shape[-2] != length for k, _ in layers):
        raise ValueError(f"the shared prefix ({length} tokens) is longer than a layer's sliding window (that layer's "
                         "cache holds only its end): share a shorter prefix, or none")
    token = _PREFIX.set(layers)
    try:
        yield
    finally:
        _PREFIX.reset(token)


def _own_mask(mask: torch.Tensor | None, q: int, s: int, device: torch.device) -> torch.Tensor:
    """A row's mask over its own ``s`` key slots for ``q`` queries (``[n|1, 1, q, s]``, True: visible); None: causal."""
    if mask is None:
        return torch.ones(q, s, dtype=torch.bool, device=device).tril(s - q)[None, None]
    return mask.bool()


def _joined(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
            prefix_keys: torch.Tensor, prefix_values: torch.Tensor, scaling: float | None) -> torch.Tensor:
    """:func:`_cascade`'s attention as one SDPA call: the prefix's keys and values put ahead of every row's own
    for this call only, the prefix visible to every query. Returns ``[n, q, heads, d]``."""
    n, q, p = query.shape[0], query.shape[2], prefix_keys.shape[2]
    own = _own_mask(mask, q, key.shape[2], query.device)
    keys = torch.cat([prefix_keys.expand(n, -1, -1, -1), key], 2)
    values = torch.cat([prefix_values.expand(n, -1, -1, -1), value], 2)
    visible = torch.cat([own.new_ones(*own.shape[:-1], p), own], -1)
    out = F.scaled_dot_product_attention(query, keys, values, attn_mask=visible, scale=scaling,
                                         enable_gqa=key.shape[1] != query.shape[1])
    return out.transpose(1, 2).contiguous()


def _cascade(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
             prefix_keys: torch.Tensor, prefix_values: torch.Tensor, scaling: float | None) -> torch.Tensor:
    """Attention of ``query [n, heads, q, d]`` over the shared prefix (``[1, kv_heads, P, d]``, visible to all)
    and each row's own ``key``/``value`` (``[n, kv_heads, s, d]``, under ``mask`` ``[n, 1, q, s]``, True: visible;
    None: causal), in float32; returns ``[n, q, heads, d]`` in the query's dtype."""
    n, heads, q, d = query.shape
    kv_heads, s = key.shape[1], key.shape[2]
    g = heads // kv_heads
    scale = scaling if scaling is not None else d ** -0.5
    grouped = query.float().reshape(n, kv_heads, g * q, d) * scale  # query heads grouped by their key/value head
    # the prefix: one product over every row's queries
    flat = grouped.transpose(0, 1).reshape(kv_heads, n * g * q, d)
    shared = flat @ prefix_keys[0].float().transpose(1, 2)  # [kv_heads, n·g·q, P]
    m1 = shared.amax(-1, keepdim=True)
    e1 = (shared - m1).exp()
    o1 = (e1 @ prefix_values[0].float()).reshape(kv_heads, n, g * q, value.shape[-1]).transpose(0, 1)
    m1, l1 = (t.reshape(kv_heads, n, g * q, 1).transpose(0, 1) for t in (m1, e1.sum(-1, keepdim=True)))
    # each row's own tokens
    own = grouped @ key.float().transpose(2, 3)  # [n, kv_heads, g·q, s]
    mask = _own_mask(mask, q, s, query.device)
    visible = mask.reshape(mask.shape[0], mask.shape[1], 1, q, s).expand(-1, -1, g, -1, -1)
    own = own.masked_fill(~visible.reshape(visible.shape[0], visible.shape[1], g * q, s), float("-inf"))
    m2 = own.amax(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).min)  # a row seeing none of its own
    e2 = (own - m2).exp()
    o2, l2 = e2 @ value.float(), e2.sum(-1, keepdim=True)
    m = torch.maximum(m1, m2)
    w1, w2 = (m1 - m).exp(), (m2 - m).exp()
    out = (o1 * w1 + o2 * w2) / (l1 * w1 + l2 * w2)  # [n, kv_heads, g·q, d]
    return out.reshape(n, heads, q, value.shape[-1]).transpose(1, 2).contiguous().to(query.dtype)
