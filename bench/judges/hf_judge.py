"""A local or Hub causal-LM judge with the GPT-judge completion protocol (``True:`` / ``Helpful:``).

Defaults to AllenAI's Llama-2 re-trainings of GPT-judge and GPT-info. For each item the judge reads the
next-token distribution after :func:`completion_prompt` and reports

    P = p(" yes") / (p(" yes") + p(" no"))

where p is the full softmax over the vocabulary (equivalently ``sigmoid(logit_yes - logit_no)``). The ``" yes"`` /
``" no"`` token is the first token that the tokenizer produces for that word right after the prompt suffix
(``"True:"`` + ``" yes"``); for byte-level BPE tokenizers this is the first token of ``encode(" yes")``, while for
SentencePiece tokenizers (Llama-2) it avoids picking up a bare ``"▁"`` piece.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from bench.judges.base import PROMPT_SUFFIX, THRESHOLD, Judge, JudgeItem, Verdict, completion_prompt, register_judge
from bench.models import DTYPES, LoadedModel, ModelNotAvailableError, default_device, default_dtype

DEFAULT_TRUTH_MODEL = "allenai/truthfulqa-truth-judge-llama2-7B"
DEFAULT_INFO_MODEL = "allenai/truthfulqa-info-judge-llama2-7B"

LM = tuple[PreTrainedModel, PreTrainedTokenizerBase]


def yes_no_token_ids(tokenizer: PreTrainedTokenizerBase, context: str = "True:") -> tuple[int, int]:
    """Ids of the first tokens of ``" yes"`` and ``" no"`` as they follow ``context`` (see the module docstring)."""
    base = tokenizer.encode(context, add_special_tokens=False)
    ids = []
    for word in (" yes", " no"):
        full = tokenizer.encode(context + word, add_special_tokens=False)
        if len(full) > len(base) and full[: len(base)] == base:
            ids.append(full[len(base)])
        else:
            ids.append(tokenizer.encode(word, add_special_tokens=False)[0])
    if ids[0] == ids[1]:
        raise ValueError(f"the judge tokenizer encodes ' yes' and ' no' with the same first token ({ids[0]}, "
                         f"{tokenizer.convert_ids_to_tokens(ids[0])!r}); it cannot tell the verdicts apart")
    return ids[0], ids[1]


def _load(source: str, device: str, dtype: torch.dtype) -> LM:
    kwargs: dict = {"dtype": dtype}
    if device.startswith("cuda"):
        kwargs["device_map"] = "auto" if device == "cuda" else device
    try:
        AutoConfig.from_pretrained(source)  # cheap, with the clearest error when the model is missing
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as err:
        raise ModelNotAvailableError(
            f"could not load the judge model {source!r}: {err}\n"
            "To make it available, download it on a machine with internet, e.g. "
            f"`hf download {DEFAULT_TRUTH_MODEL} --local-dir TRUTH_DIR` and "
            f"`hf download {DEFAULT_INFO_MODEL} --local-dir INFO_DIR`, copy the directories here and pass "
            "truth_model=TRUTH_DIR, info_model=INFO_DIR (or point HF_HOME at a Hugging Face cache holding them)."
        ) from err
    if not device.startswith("cuda"):
        model.to(device)
    model.eval()
    return model, tokenizer


def _as_pair(lm: LM | LoadedModel) -> LM:
    return (lm.model, lm.tokenizer) if isinstance(lm, LoadedModel) else (lm[0], lm[1])


def _label(lm: LM | LoadedModel) -> str:
    if isinstance(lm, LoadedModel):
        return lm.identity
    return getattr(lm[0].config, "_name_or_path", "") or "in-memory model"


@register_judge("hf")
class HFJudge(Judge):
    """GPT-judge-style truth and info judges run locally with transformers (see the module docstring).

    ``truth_lm`` / ``info_lm``: already-loaded ``(model, tokenizer)`` pairs (or :class:`LoadedModel`) instead of
    loading ``truth_model`` / ``info_model``.
    """

    name = "hf"

    def __init__(self, truth_model: str | None = None, info_model: str | None = None, device: str | None = None,
                 dtype: str | None = None, batch_size: int = 8, truth_lm: LM | LoadedModel | None = None,
                 info_lm: LM | LoadedModel | None = None) -> None:
        if dtype is not None and dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; valid: {', '.join(DTYPES)}")
        device = device or default_device()
        torch_dtype = DTYPES[dtype] if dtype else default_dtype(device)
        loaded: dict[str, LM] = {}

        def resolve(source: str | None, default: str, given: LM | LoadedModel | None) -> tuple[str, LM]:
            if given is not None:
                return source or _label(given), _as_pair(given)
            source = source or default
            if source not in loaded:
                loaded[source] = _load(source, device, torch_dtype)
            return source, loaded[source]

        self.truth_model, self.truth_lm = resolve(truth_model, DEFAULT_TRUTH_MODEL, truth_lm)
        self.info_model, self.info_lm = resolve(info_model, DEFAULT_INFO_MODEL, info_lm)
        self.batch_size = max(1, batch_size)

    def identity(self) -> dict:
        return {"backend": "hf", "truth_model": self.truth_model, "info_model": self.info_model,
                "protocol": "completion", "threshold": THRESHOLD}

    def judge(self, items: Sequence[JudgeItem]) -> list[Verdict]:
        truth = self.p_yes(self.truth_lm, [completion_prompt(i.question, i.answer, "truth") for i in items], "truth")
        info = self.p_yes(self.info_lm, [completion_prompt(i.question, i.answer, "info") for i in items], "info")
        return [Verdict(t, i) for t, i in zip(truth, info)]

    @torch.no_grad()
    def p_yes(self, lm: LM, prompts: Sequence[str], aspect: str) -> list[float]:
        """P(" yes") / (P(" yes") + P(" no")) after each prompt; left-padded batches of ``batch_size``."""
        model, tokenizer = lm
        yes, no = yes_no_token_ids(tokenizer, PROMPT_SUFFIX[aspect])
        pad = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)
        device = next(model.parameters()).device
        extra = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
        out: list[float] = []
        for start in range(0, len(prompts), self.batch_size):
            encoded = [tokenizer(p)["input_ids"] for p in prompts[start : start + self.batch_size]]
            width = max(len(e) for e in encoded)
            ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded], device=device)
            mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded], device=device)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, **extra).logits[:, -1]
            logp = logits.float().log_softmax(-1)
            out += torch.sigmoid(logp[:, yes] - logp[:, no]).tolist()
        return out
