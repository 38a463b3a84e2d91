"""The hf judge protocol on a tiny randomly initialised Llama (no download)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bench.judges.base import JudgeItem, completion_prompt
from bench.judges.hf_judge import HFJudge, yes_no_token_ids
from bench.models import ModelNotAvailableError, tiny_model, tiny_tokenizer

ITEMS = [
    JudgeItem("What is the capital of France?", "The capital of France is Paris."),
    JudgeItem("Where were the 1992 Olympics held?", "I have no comment."),
    JudgeItem("What do telescopes use?", ""),  # empty answer
    JudgeItem("Is it true?", "yes"),
]


def test_tiny_tokenizer_yes_no_tokens() -> None:
    """The plain tiny tokenizer has no " yes" token, but its first pieces differ from " no" (usable, if crude)."""
    tok = tiny_tokenizer()
    yes, no = yes_no_token_ids(tok)
    assert yes == tok.encode(" yes", add_special_tokens=False)[0]
    assert no == tok.encode(" no", add_special_tokens=False)[0]
    assert tok.decode([no]) == " no"


def test_same_first_token_is_an_error() -> None:
    """A byte-level tokenizer without merges starts " yes" and " no" with the same token."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=1, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    raw.train_from_iterator(["abc"], trainer)
    with pytest.raises(ValueError, match="same first token"):
        yes_no_token_ids(PreTrainedTokenizerFast(tokenizer_object=raw))


def test_sentencepiece_style_tokenizer() -> None:
    """Llama-2 style (prepend "▁", spaces -> "▁"): encode(" yes") starts with "▁▁", but "▁yes" follows "True:"."""
    from tokenizers import Tokenizer, models, normalizers
    from transformers import PreTrainedTokenizerFast

    merges = [("▁", "▁"), ("T", "r"), ("Tr", "u"), ("Tru", "e"), ("▁", "True"), ("y", "e"), ("ye", "s"),
              ("▁", "yes"), ("n", "o"), ("▁", "no")]
    pieces = ["▁", "T", "r", "u", "e", ":", "y", "s", "n", "o", *("".join(m) for m in merges)]
    raw = Tokenizer(models.BPE(vocab={p: i for i, p in enumerate(dict.fromkeys(pieces))}, merges=merges))
    raw.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok = PreTrainedTokenizerFast(tokenizer_object=raw)
    assert tok.convert_ids_to_tokens(tok.encode(" yes", add_special_tokens=False))[0] == "▁▁"
    assert tok.convert_ids_to_tokens(list(yes_no_token_ids(tok))) == ["▁yes", "▁no"]


@pytest.fixture(scope="module")
def judge_lm():
    """A tiny Llama whose tokenizer has a single " yes" token (added here; the corpus lacks the word)."""
    loaded = tiny_model("llama", seed=3, n_layers=2)
    tokenizer = loaded.tokenizer
    tokenizer.add_tokens([" yes"])
    torch.manual_seed(0)
    loaded.model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    assert tokenizer.convert_ids_to_tokens(yes_no_token_ids(tokenizer)[0]) == " yes"
    return loaded.model, tokenizer


def direct_p_yes(model, tokenizer, prompt: str, aspect: str) -> float:
    yes, no = yes_no_token_ids(tokenizer, "True:" if aspect == "truth" else "Helpful:")
    with torch.no_grad():
        logits = model(**tokenizer(prompt, return_tensors="pt")).logits[0, -1]
    probs = logits.double().softmax(-1)
    return float(probs[yes] / (probs[yes] + probs[no]))


def test_probability_matches_logits(judge_lm) -> None:
    model, tokenizer = judge_lm
    judge = HFJudge(truth_lm=judge_lm, info_lm=judge_lm, batch_size=1, device="cpu")
    verdicts = judge.judge(ITEMS)
    for item, verdict in zip(ITEMS, verdicts):
        for aspect, p in (("truth", verdict.p_true), ("info", verdict.p_info)):
            expected = direct_p_yes(model, tokenizer, completion_prompt(item.question, item.answer, aspect), aspect)
            assert p == pytest.approx(expected, abs=1e-6)
            assert 0.0 <= p <= 1.0
    assert len({round(v.p_true, 6) for v in verdicts}) > 1  # the prompts actually differ
    assert judge.identity() == {"backend": "hf", "truth_model": judge.truth_model, "info_model": judge.info_model,
                                "protocol": "completion", "threshold": 0.5}


def test_batching_matches_single(judge_lm) -> None:
    single = HFJudge(truth_lm=judge_lm, info_lm=judge_lm, batch_size=1, device="cpu").judge(ITEMS)
    batched = HFJudge(truth_lm=judge_lm, info_lm=judge_lm, batch_size=3, device="cpu").judge(ITEMS)
    for a, b in zip(single, batched):
        assert a.p_true == pytest.approx(b.p_true, abs=1e-5)
        assert a.p_info == pytest.approx(b.p_info, abs=1e-5)


def test_plain_tiny_model(tiny_llama) -> None:
    """The session tiny Llama (no " yes" token) still yields probabilities in [0, 1]."""
    judge = HFJudge(truth_lm=tiny_llama, info_lm=(tiny_llama.model, tiny_llama.tokenizer), batch_size=2,
                    device="cpu", truth_model="tiny-truth")
    verdicts = judge.judge(ITEMS[:3])
    assert all(0.0 <= p <= 1.0 for v in verdicts for p in (v.p_true, v.p_info))
    assert judge.identity()["truth_model"] == "tiny-truth"
    assert judge.identity()["info_model"]  # labelled from the model config, never empty


def test_missing_model_explains_how_to_provide_it(tmp_path: Path) -> None:
    with pytest.raises(ModelNotAvailableError, match="local-dir"):
        HFJudge(truth_model=str(tmp_path), info_model=str(tmp_path), device="cpu")
