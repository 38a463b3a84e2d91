"""Grouped attention (bench.attention): the same numbers as transformers' SDPA attention, without the key/value
copies, on the loaded models' layouts (padding masks, a KV cache, Gemma-3's sliding window)."""

from __future__ import annotations

import pytest
import torch
import transformers.integrations.sdpa_attention as sdpa

from bench.attention import NAME, use_grouped, use_plain
from bench.decoding import cache_kwarg
from tiny_models import tiny_model


def _padded_pass_with_cache(lm) -> torch.Tensor:
    """Logits of a left-padded batch fed in two calls (a prompt, then three tokens on top of its KV cache)."""
    tok = lm.tokenizer
    enc = tok(["The cat sat on the mat", "Paris"], return_tensors="pt", padding=True, padding_side="left")
    with torch.no_grad():
        first = lm.model(**enc, use_cache=True)
        more = torch.tensor([tok("is here")["input_ids"][:3]] * 2)
        mask = torch.cat([enc["attention_mask"], torch.ones(2, more.shape[1], dtype=torch.long)], 1)
        second = lm.model(input_ids=more, attention_mask=mask, **{cache_kwarg(lm.model): first.past_key_values})
    return torch.cat([first.logits, second.logits], 1)


@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_grouped_attention_equals_transformers_sdpa_without_copying_keys(family, monkeypatch):
    lm = tiny_model(family, seed=3)
    assert lm.model.config._attn_implementation == NAME  # what a loaded model runs
    copies = []
    real = sdpa.repeat_kv
    monkeypatch.setattr(sdpa, "repeat_kv", lambda x, n: copies.append(n) or real(x, n))
    grouped = _padded_pass_with_cache(lm)
    assert copies == []  # no key/value head was copied
    use_plain(lm.model)
    plain = _padded_pass_with_cache(lm)
    assert copies  # transformers' own attention copies them (4 query heads over 2 key/value heads)
    assert torch.equal(grouped, plain)


def test_earlier_paths_undo_the_speed_settings_and_only_sdpa_models_switch():
    lm = tiny_model("llama", seed=1)
    assert lm.head_hook is not None
    lm.use_earlier_paths()
    assert lm.head_hook is None and lm.model.config._attn_implementation == "sdpa"
    lm.use_earlier_paths()  # twice is harmless
    lm.model.set_attn_implementation("eager")
    assert not use_grouped(lm.model) and lm.model.config._attn_implementation == "eager"
