"""Grouped attention (bench.attention): the same numbers as transformers' SDPA attention, without the key/value
copies, on the loaded models' layouts (padding masks, a KV cache, Gemma-3's sliding window)."""

from __future__ import annotations

import pytest
import torch
import transformers.integrations.sdpa_attention as sdpa

from bench.attention import NAME, prefix_attention, prefix_length, use_grouped, use_plain
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


@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_prefix_attention_equals_the_prefix_copied_into_every_rows_cache(family):
    """Rows ``[prefix | padding | own tokens]`` run whole vs the prefix run once and attended by every row
    (bench.attention.prefix_attention) with only ``[padding | own tokens]`` fed: the same logits at every own
    token, up to float summation order."""
    lm = tiny_model(family, seed=5)
    tok = lm.tokenizer
    prefix = tok("Q: What is France?")["input_ids"]
    own = [tok(" A: Paris")["input_ids"], tok(" A: no comment")["input_ids"]]
    w, p = max(map(len, own)), len(prefix)
    assert p + w < 16  # within the tiny Gemma-3's sliding window (what decoding and scoring check before sharing)
    pad = [w - len(o) for o in own]
    ids = torch.tensor([[tok.pad_token_id] * k + o for k, o in zip(pad, own)])
    mask = torch.tensor([[0] * k + [1] * len(o) for k, o in zip(pad, own)])
    pos = torch.tensor([[0] * k + list(range(p, p + len(o))) for k, o in zip(pad, own)])
    with torch.no_grad():
        whole = lm.model(input_ids=torch.cat([torch.tensor([prefix] * 2), ids], 1),
                         attention_mask=torch.cat([torch.ones(2, p, dtype=torch.long), mask], 1),
                         position_ids=torch.cat([torch.arange(p).expand(2, p), pos], 1)).logits[:, p:]
        shared = lm.model(input_ids=torch.tensor([prefix]), use_cache=True)
        with prefix_attention(shared.past_key_values, p):
            assert prefix_length() == p
            cascaded = lm.model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    assert prefix_length() == 0
    real = mask.bool()
    torch.testing.assert_close(cascaded[real], whole[real], rtol=1e-4, atol=1e-5)
    assert torch.isfinite(cascaded).all()  # padding queries, which see no own token, stay finite too


def test_a_prefix_cut_by_a_sliding_window_is_refused():
    lm = tiny_model("gemma", seed=5)  # sliding window 16
    ids = lm.tokenizer("Q: " * 20)["input_ids"]
    with torch.no_grad():
        shared = lm.model(input_ids=torch.tensor([ids]), use_cache=True)
    with pytest.raises(ValueError, match="sliding window"), prefix_attention(shared.past_key_values, len(ids)):
        pass


def test_without_prefix_attention_each_row_holds_a_copy_of_the_prefix_with_the_same_results():
    """A model on another attention implementation (and the earlier code path) shares the prefix by copying it
    into every row's cache: the same answers and scores as attending to it once."""
    from bench.decoding import attends, shared_prefix
    from bench.generation import gen_prompt, generate
    from bench.scoring import answer_logprobs, common_prefix, encode

    lm = tiny_model("llama", seed=2)
    prompts = [gen_prompt(f"What is fact {i}?" + " really" * i, "qa") for i in range(5)]
    texts = [(p, p + " It is " + "so " * i) for i, p in enumerate(prompts)]
    seqs = [encode(lm, t, len(p)) for p, t in texts]
    assert common_prefix(seqs) > 10
    ids = lm.tokenizer(prompts)["input_ids"]
    runs = []
    for _ in range(2):
        held = attends(lm, shared_prefix(lm, ids), ids, 8)
        runs.append((held, generate(lm, prompts, None, max_new_tokens=8, batch_size=3),
                     answer_logprobs(lm, seqs, batch_size=2)))
        use_plain(lm.model)
    (first, answers, scores), (second, copied, copied_scores) = runs
    assert first and not second
    assert copied == answers
    assert copied_scores == pytest.approx(scores, abs=1e-5)


def test_rows_that_would_outgrow_a_sliding_window_copy_the_prefix_instead():
    """Past a sliding window the real model hides the prefix's start, which a held prefix would show: decoding
    then copies the prefix into each row's cache (whose window masks it correctly)."""
    from bench.decoding import attends, shared_prefix

    lm = tiny_model("gemma", seed=2)  # sliding window 16
    ids = lm.tokenizer(["Q: What is France? A:", "Q: What is France? It is"])["input_ids"]
    prefix = shared_prefix(lm, ids)
    room = 16 - prefix.length - 2 * (max(map(len, ids)) - prefix.length)  # new tokens that keep every row inside
    assert room > 1
    assert attends(lm, prefix, ids, room - 1) and not attends(lm, prefix, ids, room)


@pytest.mark.parametrize("queries", [1, 5])
@pytest.mark.parametrize("causal", [False, True])
def test_joined_and_cascade_attention_agree_with_one_softmax_over_prefix_and_own_keys(queries, causal):
    """The two ways rows attend to a prefix held once (one fused SDPA over the prefix put ahead of each row's own
    keys, for passes of several tokens; the cascade, for one-token steps) equal plain attention over the keys
    concatenated, with a row that sees none of its own keys (only the prefix) and grouped key/value heads."""
    from bench.attention import _cascade, _joined

    g = torch.Generator().manual_seed(queries)
    n, heads, kv, d, own, p = 3, 4, 2, 8, 6, 5
    query = torch.randn(n, heads, queries, d, generator=g)
    key, value = (torch.randn(n, kv, own, d, generator=g) for _ in range(2))
    pk, pv = (torch.randn(1, kv, p, d, generator=g) for _ in range(2))
    mask = None if causal else torch.rand(n, 1, queries, own, generator=g) > 0.4
    if mask is not None:
        mask[0] = False  # row 0 sees only the prefix
    visible = (torch.ones(queries, own, dtype=torch.bool).tril(own - queries)[None, None].expand(n, 1, -1, -1)
               if causal else mask)
    keys = torch.cat([pk.expand(n, -1, -1, -1), key], 2).repeat_interleave(heads // kv, 1)
    values = torch.cat([pv.expand(n, -1, -1, -1), value], 2).repeat_interleave(heads // kv, 1)
    full = torch.cat([torch.ones(n, 1, queries, p, dtype=torch.bool), visible], -1)
    scores = (query @ keys.transpose(2, 3) / d ** 0.5).masked_fill(~full, float("-inf"))
    expected = (scores.softmax(-1) @ values).transpose(1, 2)
    for attend in (_joined, _cascade):
        got = attend(query, key, value, mask, pk, pv, None)
        assert got.shape == (n, queries, heads, d)
        assert torch.allclose(got, expected, atol=1e-5), attend.__name__
