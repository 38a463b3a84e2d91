import pytest
import torch

from bench.capture import capture, qa_text
from bench.sites import recorded


@pytest.mark.parametrize("site", ["heads", "attn-out"])
def test_batched_capture_equals_one_by_one_and_is_cached(tiny_gemma, tmp_path, monkeypatch, site):
    monkeypatch.setenv("BENCH_ACTIVATION_CACHE", str(tmp_path))
    lm = tiny_gemma
    texts = [qa_text("What is fact 1?", "It is true."), qa_text("Why?", "No."),
             qa_text("Where were the 1992 Olympics held?", "The 1992 Olympics were held in Barcelona, Spain.")]
    acts = capture(lm, texts, [0, 2], site, batch_size=2)
    heads, dim = lm.spec.site_shape(site)
    assert acts[2].shape == (3, heads, dim)
    for i, text in enumerate(texts):
        enc = lm.tokenizer(text, return_tensors="pt")
        with torch.no_grad(), recorded(lm.model, lm.spec, [0, 2], site) as store:
            lm.model(**enc)
        for layer in (0, 2):
            torch.testing.assert_close(acts[layer][i], store[layer][0, -1].reshape(heads, dim), atol=1e-5, rtol=1e-5)
    files = list(tmp_path.glob("*.safetensors"))
    assert len(files) == 2
    # second call is served from disk
    monkeypatch.setattr("bench.capture._compute", lambda *a, **k: pytest.fail("recomputed despite the cache"))
    again = capture(lm, texts, [0, 2], site)
    assert torch.equal(again[0], acts[0])


def test_cached_activations_are_keyed_by_dtype(tmp_path, monkeypatch):
    """fp32 activations are not served to a bf16 run of the same model (nor the other way round)."""
    from bench.capture import cache_key
    from tiny_models import tiny_model

    monkeypatch.setenv("BENCH_ACTIVATION_CACHE", str(tmp_path))
    texts = [qa_text("Why?", "No.")]
    assert cache_key("m", "torch.float32", "heads", 0, texts) != cache_key("m", "torch.bfloat16", "heads", 0, texts)
    lm = tiny_model("llama", seed=0)  # its own copy: the session's tiny models must stay float32
    fp32 = capture(lm, texts, [0])
    lm.model.to(torch.bfloat16)
    bf16 = capture(lm, texts, [0])
    assert len(list(tmp_path.glob("*.safetensors"))) == 2 and bf16[0].dtype == torch.float32
    assert not torch.equal(fp32[0], bf16[0])


def test_capture_rejects_out_of_range_layers(tiny_llama):
    with pytest.raises(ValueError, match="out of range"):
        capture(tiny_llama, ["Q: a A: b"], [7])


def test_non_finite_activations_stop_with_location(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("BENCH_ACTIVATION_CACHE", str(tmp_path))
    lm = tiny_llama
    layer = lm.spec.o_proj(lm.model, 1)
    handle = layer.register_forward_pre_hook(lambda _m, args: (args[0] * float("nan"),))
    try:
        with pytest.raises(FloatingPointError, match="layer 1"):
            capture(lm, ["Q: a A: b"], [1], use_cache=False)
    finally:
        handle.remove()
