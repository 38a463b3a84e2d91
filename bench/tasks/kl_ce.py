"""CE and KL vs the unintervened model (ITI protocol): 100 windows of 128 tokens, the hook on and off in one model.

CE is the intervened model's next-token loss; KL is KL(original ‖ intervened) summed over the vocabulary and
averaged over every predicted position. The edit applies at every position.

Texts (:func:`load_texts`): the Hub's openwebtext-10k when it can provide them now (in the local cache, or the Hub
answers one probe request), else the offline RealToxicityPrompts ``nontoxic`` prompt texts (logged). With
``HF_HUB_OFFLINE`` (or ``HF_DATASETS_OFFLINE``) set the Hub is never asked; the explicit ``hub`` source then needs
openwebtext-10k in the local cache and otherwise fails naming the offline sources.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bench.earlier import kl_ce_batch
from bench.hub import cached, hub_unreachable, offline_variable
from bench.metrics import Metric
from bench.models import LoadedModel
from bench.redact import redact, redacted
from bench.runs import summarise
from bench.sites import layer_input, resumed
from bench.tasks.base import Part, register_part

HUB_TEXTS = "stas/openwebtext-10k"
OFFLINE_TEXTS = "nontoxic"  # RealToxicityPrompts prompt texts (sentences from OpenWebText)
OFFLINE_SOURCES = "nontoxic, toxic, challenging (RealToxicityPrompts prompt texts) or the path of a JSONL file"

log = logging.getLogger(__name__)


def load_texts(source: str | None, data_dir: str | Path | None, seed: int) -> tuple[list[str], str]:
    """Texts to window, shuffled with ``seed``, and their source: ``hub`` (openwebtext-10k), a toxicity file
    name/path, or auto (None: the Hub's texts when it can provide them now, else the offline ``nontoxic`` texts)."""
    from bench.data.toxicity import load_prompt_texts

    rng = np.random.RandomState(seed)
    if source in (None, "hub"):
        texts = _hub_texts(rng, required=source == "hub")
        if texts is not None:
            return texts, f"hub:{HUB_TEXTS}"
    texts, path = load_prompt_texts(source or OFFLINE_TEXTS, data_dir)
    return [texts[i] for i in rng.permutation(len(texts))], path


def _hub_unavailable() -> str | None:
    """Why openwebtext-10k cannot be had now without waiting on the network (see :mod:`bench.hub`), or None."""
    if cached(HUB_TEXTS, "README.md", "dataset"):
        return None  # datasets reads it from the local cache (offline: without asking the Hub)
    variable = offline_variable()
    if variable:
        return f"{variable} is set and {HUB_TEXTS} is not in the local Hugging Face cache"
    why = hub_unreachable(HUB_TEXTS, "dataset")
    return f"the Hugging Face Hub cannot be reached ({why})" if why else None


def _hub_texts(rng: np.random.RandomState, required: bool) -> list[str] | None:
    """1000 openwebtext-10k texts, or None when the Hub cannot provide them (``required``: raise instead)."""
    why = _hub_unavailable()
    if why is None:
        try:
            from datasets import load_dataset

            ds = load_dataset(HUB_TEXTS, split="train")
            idx = rng.permutation(len(ds))
            return [ds[int(i)]["text"] for i in idx[:1000]]
        except Exception as err:  # noqa: BLE001 - offline: fall back (or report when explicitly asked)
            if required:
                raise RuntimeError(f"could not load {HUB_TEXTS} from the Hub: {redact(err)}") from redacted(err)
            why = f"loading it failed ({type(err).__name__})"
    if required:
        raise RuntimeError(f"KL/CE texts 'hub' ({HUB_TEXTS}) are not available: {why}. Offline sources: "
                           f"{OFFLINE_SOURCES} (--kl-source)")
    log.info("KL/CE texts: %s: using the offline %r texts instead", why, OFFLINE_TEXTS)
    return None


def make_windows(lm: LoadedModel, texts: list[str], n_windows: int = 100, length: int = 128) -> torch.Tensor:
    """``[n_windows, length]`` token ids: the texts joined by spaces, tokenised once, cut into consecutive
    windows, each starting with BOS when the tokenizer has one."""
    tok = lm.tokenizer
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    body = length - len(bos)
    need = n_windows * body
    ids: list[int] = []
    for t in texts:  # grow until there are enough tokens (texts are short sentences)
        ids.extend(tok(" " + t.strip() if ids else t.strip(), add_special_tokens=False)["input_ids"])
        if len(ids) >= need:
            break
    if len(ids) < need:
        raise ValueError(f"the text source has {len(ids)} tokens; {n_windows} windows of {length} need {need}")
    return torch.tensor([bos + ids[i * body:(i + 1) * body] for i in range(n_windows)])


#: Positions whose vocabulary rows are processed together (float32 rows of at most 4 Mi elements, 16 MB): the
#: per-position statistics are row-wise, and temporaries of this size are reused by the allocator, where the
#: whole batch's (``[batch, 128, vocabulary]``, 0.4 GB on smollm2 and 2.1 GB on gemma3 at batch 16) were
#: allocated and faulted in afresh several times per batch.
CHUNK_ELEMENTS = 1 << 22


def _position_stats(base: torch.Tensor, logits: torch.Tensor, target: torch.Tensor, same: bool
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per position of one window (rows of ``[n, vocab]`` logits): the CE of ``logits`` at ``target`` and
    KL(softmax(base) ‖ softmax(logits)) (0 where ``same``: one model, nothing edited), in chunks of rows."""
    ce, kl = [], []
    step = max(1, CHUNK_ELEMENTS // base.shape[-1])
    for s in range(0, len(base), step):
        lp_base = F.log_softmax(base[s:s + step].float(), -1)
        lp = lp_base if same else F.log_softmax(logits[s:s + step].float(), -1)
        ce.append(-lp.gather(-1, target[s:s + step, None])[:, 0])
        kl.append(torch.zeros_like(ce[-1]) if same else (lp_base.exp() * (lp_base - lp)).sum(-1).clamp_min(0))
    return torch.cat(ce), torch.cat(kl)


def _batch_stats(lm: LoadedModel, ids: torch.Tensor, intervention) -> tuple[list[float], list[float]]:
    """Per-window CE (intervened) and mean per-position KL of one batch of windows. The intervened pass starts at
    the first edited layer, from the hidden states the unintervened pass fed it (:func:`bench.sites.resumed`):
    the layers below compute the same thing in both passes."""
    on = intervention is not None and bool(intervention.modules)

    def run() -> torch.Tensor:  # no KV cache: nothing reads one
        return lm.model(input_ids=ids, use_cache=False).logits[:, :-1]

    if not on:
        base = logits = run()
    else:
        start = min(intervention.layers)
        with layer_input(lm.model, lm.spec, start) as entering:
            base = run()
        with intervention.applied(lm, "all"), resumed(lm.model, lm.spec, start, entering):
            logits = run()
    # a window's rows are contiguous: no copy of the batch's logits
    stats = [_position_stats(base[b], logits[b], ids[b, 1:], same=not on) for b in range(len(ids))]
    return torch.stack([ce.mean() for ce, _ in stats]).tolist(), torch.stack([kl.mean() for _, kl in stats]).tolist()


@torch.no_grad()
def kl_ce(lm: LoadedModel, windows: torch.Tensor, intervention=None, batch_size: int = 8) -> dict[str, list[float]]:
    """Per-window CE (intervened) and mean per-position KL(original ‖ intervened)."""
    stats = kl_ce_batch if lm.earlier_paths else _batch_stats  # the earlier code path (RunConfig.legacy_paths)
    device = next(lm.model.parameters()).device
    ce, kl = [], []
    for s in range(0, len(windows), batch_size):
        batch_ce, batch_kl = stats(lm, windows[s:s + batch_size].to(device), intervention)
        ce.extend(batch_ce)
        kl.extend(batch_kl)
    return {"ce": ce, "kl": kl}


def _prepare(cfg, data_dir, echo) -> tuple[list[str], str]:
    if cfg.limit is not None:  # its windows do not shrink with --limit (ITI's protocol)
        echo(f"KL/CE reads {cfg.kl_windows} windows × {cfg.kl_length} tokens per fold whatever --limit says "
             f"({2 * cfg.kl_windows * cfg.kl_length:,} forward tokens per fold); --kl-windows N shortens it")
    return load_texts(cfg.kl_source, data_dir, cfg.seed)


def windows(state) -> torch.Tensor:
    """The run's KL/CE windows (the texts loaded before the model, tokenised once per run)."""
    if "klce_windows" not in state.shared:
        cfg = state.cfg
        texts, _ = state.shared["klce"]
        state.shared["klce_windows"] = make_windows(state.lm, texts, cfg.kl_windows, cfg.kl_length)
    return state.shared["klce_windows"]


def _part(state, k: int, items: list, iv) -> dict:
    vals = kl_ce(state.lm, windows(state), iv, batch_size=state.cfg.eval_batch_size)
    return {"metrics": {m: summarise(v) for m, v in vals.items()}, "windows": vals, "source": state.shared["klce"][1]}


def _finish(state, folds: list[dict], results: dict) -> None:
    """The texts' source as each fold's part recorded it (a part written before parts recorded it: today's)."""
    sources = {f.get("kl_ce_source") for f in folds}
    if None in sources:
        sources = (sources - {None}) | {state.shared["klce"][1]}
    cfg = state.cfg
    results["data"]["kl_ce_texts"] = {"source": " + ".join(sorted(sources)), "windows": cfg.kl_windows,
                                      "tokens": cfg.kl_length}


KLCE = register_part(Part(
    "klce", _part,
    (Metric("ce", "CE", "nats/token", higher_is_better=False, column=8, sweep_plot=True),
     Metric("kl", "KL", "nats/token", higher_is_better=False, column=9, sweep_plot=True)),
    fold_record=lambda res: {"kl_ce_windows": res.get("windows"), "kl_ce_source": res.get("source")},
    fold_private=("kl_ce_windows", "kl_ce_source"), finish=_finish,
    settings=("kl_windows", "kl_length", "kl_source", "eval_batch_size"),
    prepare=_prepare))
