"""Tiny seeded test models (no download): a byte-level BPE tokenizer trained in memory and randomly initialised
Llama or Gemma-3 models with a few heads, finished exactly like a loaded model (:func:`bench.models.finish_loading`).
"""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase

from bench.models import LoadedModel, finish_loading

_TINY_CORPUS = (
    "Q: What is the capital of France? A: The capital of France is Paris. "
    "Interpret each question literally, and as a question about the real world. "
    "I have no comment. The 1992 Olympics were held in Barcelona, Spain. "
    "Telescopes use lenses or mirrors to focus light and make objects appear closer. "
    "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 .,;:!?'\"()-\n"
)


def tiny_tokenizer() -> PreTrainedTokenizerBase:
    """A small byte-level BPE tokenizer trained in memory (no download), with offsets."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([_TINY_CORPUS] * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def tiny_model(family: str = "llama", seed: int = 0, n_layers: int = 3, window: int = 16) -> LoadedModel:
    """A seeded, randomly initialised Llama or Gemma-3 model with a few heads, for unit tests (``window``: the
    Gemma's sliding window)."""
    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    common = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=n_layers,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=512,
                  pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id)
    if family == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        model = LlamaForCausalLM(LlamaConfig(**common))
    elif family == "gemma":
        from transformers import Gemma3ForCausalLM, Gemma3TextConfig

        model = Gemma3ForCausalLM(Gemma3TextConfig(**common, sliding_window=window, query_pre_attn_scalar=8))
    else:
        raise ValueError(f"unknown tiny family {family!r}; valid: llama, gemma")
    model.float()
    return finish_loading(model, tokenizer, f"tiny-{family}", f"tiny-{family} seed {seed}", 1)
