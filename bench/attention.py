"""Grouped-query attention on CPU without copying key/value heads.

transformers' SDPA attention copies every key/value head once per query head of its group (``repeat_kv``) whenever
an attention mask is given and more than one token is fed, because CUDA's fast kernels refuse a mask with grouped
heads. On CPU torch computes grouped heads itself (``enable_gqa``) with a mask, and the copy is what costs: on
smollm2-135m (9 query heads over 3 key/value heads) the scorer's and the decoder's multi-token passes over a
cached context spent more time copying keys and values than attending. :func:`grouped_sdpa` is that attention
with the copy left out; its outputs are bit-identical to transformers' (tested). Only torch and transformers are
needed (the GPU check imports this module on a bare machine).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

#: The attention implementation's registered name (``model.config._attn_implementation``).
NAME = "sdpa_grouped"


def grouped_sdpa(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                 is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention, except that a masked call on CPU with grouped key/value heads lets torch
    group the heads (``enable_gqa``) instead of copying keys and values per query head. Everything else (no
    mask, one key/value head per query head, other devices, soft-capping, position biases) is transformers' own."""
    plain = (query.device.type != "cpu" or attention_mask is None or getattr(module, "num_key_value_groups", 1) == 1
             or any(kwargs.get(k) is not None for k in ("softcap", "position_bias")) or kwargs.get("output_attentions"))
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
