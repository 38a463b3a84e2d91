import pytest
import torch
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from bench.sites import recorded
from bench.spec import ModelSpec

COMMON = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64)


@pytest.mark.parametrize(("cls", "cfg", "kw"), [
    (MistralForCausalLM, MistralConfig, {}),
    (Qwen2ForCausalLM, Qwen2Config, {}),
    (Gemma2ForCausalLM, Gemma2Config, {"head_dim": 8}),
])
def test_spec_and_sites_for_other_families(cls, cfg, kw):
    torch.manual_seed(0)
    model = cls(cfg(**COMMON, **kw)).eval()
    spec = ModelSpec.from_model(model)
    assert (spec.n_layers, spec.n_heads, spec.n_kv_heads, spec.head_dim) == (2, 4, 2, 8)
    with torch.no_grad(), recorded(model, spec, [1], "heads") as store:
        model(torch.tensor([[1, 2, 3]]))
    assert store[1].shape == (1, 3, spec.n_heads * spec.head_dim)


def test_unsupported_architecture_says_which_are_supported():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=16))
    with pytest.raises(ValueError, match="supported: llama"):
        ModelSpec.from_model(model)


def test_layer_range_message(tiny_llama):
    with pytest.raises(ValueError, match=r"layers 0\.\.2"):
        tiny_llama.spec.check_layer(3)
