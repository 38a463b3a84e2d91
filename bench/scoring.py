"""Batched log-probability of answer spans given a context, with an optional shared-prefix KV cache.

Every TruthfulQA MC text starts with the same instruction and primer. With ``prefix_cache=True`` the
longest token prefix shared by all texts (and ending before any answer token) is run once; each batch
reuses its keys and values. Answer spans come from the tokenizer's character offsets.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
from dataclasses import dataclass

import torch
from rich.progress import Progress

from bench.models import LoadedModel


@dataclass(frozen=True)
class Encoded:
    ids: list[int]
    answer: list[int]  # token positions of the answer (every token overlapping the answer's characters)


def encode(lm: LoadedModel, text: str, answer_start: int) -> Encoded:
    """Tokenise ``text``; the answer is every token that ends after character ``answer_start``."""
    enc = lm.tokenizer(text, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    answer = [i for i, (s, e) in enumerate(offsets) if e > answer_start and e > s]
    if not answer or answer[0] == 0:
        raise ValueError(f"no scoreable answer tokens in {text[answer_start - 20:answer_start + 40]!r}")
    return Encoded(ids, answer)


def common_prefix(seqs: list[Encoded]) -> int:
    """Length of the token prefix shared by all sequences that ends before every answer's predicting position."""
    if not seqs:
        return 0
    first = seqs[0].ids
    n = min(min(s.answer[0] for s in seqs) - 1, min(len(s.ids) for s in seqs) - 1)
    for s in seqs[1:]:
        i = 0
        while i < n and s.ids[i] == first[i]:
            i += 1
        n = i
    return max(n, 0)


def _cache_kwarg(model) -> str:  # transformers ≥ 5.24 renamed past_key_values to cache
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.no_grad()
def answer_logprobs(lm: LoadedModel, seqs: list[Encoded], intervention=None, batch_size: int = 16,
                    prefix_cache: bool = True, progress: str | None = None) -> list[float]:
    """Sum of the answer tokens' log-probs for each sequence; ``intervention`` edits the answer tokens."""
    model, pad = lm.model, lm.tokenizer.pad_token_id
    device = next(model.parameters()).device
    p = common_prefix(seqs) if prefix_cache else 0
    cache = None
    if p > 0:
        prefix = torch.tensor([seqs[0].ids[:p]], device=device)
        # an intervention that edits every token (LoFiT) edits the shared prefix too: cache it edited
        edits_all = intervention is not None and getattr(intervention, "position_policy", "task") == "all"
        with intervention.applied(lm, positions="all") if edits_all else contextlib.nullcontext():
            out_prefix = model(input_ids=prefix, use_cache=True)
        cache = getattr(out_prefix, "cache", None) or out_prefix.past_key_values
    cache_kwarg = _cache_kwarg(model)
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i].ids))
    out = [0.0] * len(seqs)
    with Progress(transient=True, disable=progress is None) as bar:
        task = bar.add_task(progress or "", total=len(seqs))
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            rows = [seqs[i] for i in idx]
            t = max(len(r.ids) for r in rows) - p
            ids = torch.full((len(rows), t), pad, dtype=torch.long)
            attn = torch.zeros(len(rows), p + t, dtype=torch.long)
            mask = torch.zeros(len(rows), t, dtype=torch.bool)
            for b, r in enumerate(rows):
                n = len(r.ids) - p
                ids[b, :n] = torch.tensor(r.ids[p:])
                attn[b, : p + n] = 1
                mask[b, [a - p for a in r.answer]] = True
            lo = min(r.answer[0] for r in rows) - p - 1  # first position whose logits are needed
            kwargs = dict(input_ids=ids.to(device), attention_mask=attn.to(device),
                          position_ids=(p + torch.arange(t)).expand(len(rows), t).to(device),
                          logits_to_keep=torch.arange(lo, t - 1, device=device), use_cache=cache is not None)
            if cache is not None:
                batch_cache = copy.deepcopy(cache)
                batch_cache.batch_repeat_interleave(len(rows))
                kwargs[cache_kwarg] = batch_cache
            if intervention is not None:
                with intervention.applied(lm, positions=mask):
                    logits = model(**kwargs).logits
            else:
                logits = model(**kwargs).logits
            logp = torch.log_softmax(logits.float(), dim=-1)  # position lo + j predicts token lo + j + 1
            for b, r in enumerate(rows):
                pos = torch.tensor([a - p for a in r.answer])
                tok = torch.tensor([r.ids[a] for a in r.answer])
                out[idx[b]] = float(logp[b, pos - 1 - lo, tok].sum())
            bar.advance(task, len(rows))
    return out
