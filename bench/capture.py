"""Batched activation capture at the last token of each text, cached on disk as safetensors."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from safetensors.torch import load_file, save_file

from bench.models import LoadedModel
from bench.paths import activation_cache_dir
from bench.progress import progress_bar
from bench.sites import recorded, site_module


def cache_key(identity: str, dtype: str, site: str, layer: int, texts: list[str]) -> str:
    """Key of one cached capture: the model, its compute dtype (bf16 activations differ from fp32 ones), site,
    layer and texts."""
    payload = json.dumps({"model": identity, "dtype": dtype, "site": site, "layer": layer, "texts": texts})
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


class _StopForward(Exception):
    """Raised by a hook once the deepest requested layer is recorded: later layers and the LM head are skipped."""


@contextmanager
def _stop_after(module: torch.nn.Module) -> Iterator[None]:
    def hook(*_args: object) -> None:
        raise _StopForward

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def _compute(lm: LoadedModel, texts: list[str], layers: list[int], site: str, batch_size: int) -> dict[int, torch.Tensor]:
    tok, model, spec = lm.tokenizer, lm.model, lm.spec
    heads, dim = spec.site_shape(site)
    out = {layer: torch.empty(len(texts), heads, dim) for layer in layers}
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    device = next(model.parameters()).device
    with progress_bar(f"capturing {site} activations", len(texts), " texts") as advance:
        for start in range(0, len(texts), batch_size):
            idx = order[start : start + batch_size]
            enc = tok([texts[i] for i in idx], return_tensors="pt", padding=True, padding_side="right")
            enc = {k: v.to(device) for k, v in enc.items()}
            last = enc["attention_mask"].sum(1) - 1
            with recorded(model, spec, layers, site) as store, _stop_after(site_module(model, spec, max(layers), site)):
                try:
                    model.model(**enc, use_cache=False)
                except _StopForward:
                    pass
            for layer in layers:
                rows = store[layer]  # on its layer's device (several devices under device_map="auto")
                acts = rows[torch.arange(len(idx), device=rows.device), last.to(rows.device)].float().cpu()
                if not torch.isfinite(acts).all():
                    bad = idx[int((~torch.isfinite(acts)).reshape(len(idx), -1).any(1).nonzero()[0])]
                    raise FloatingPointError(
                        f"non-finite activation at layer {layer}, site {site}, text #{bad}: {texts[bad][:80]!r}"
                    )
                out[layer][idx] = acts.reshape(len(idx), heads, dim)
            advance(len(idx))
    return out


def capture(lm: LoadedModel, texts: list[str], layers: list[int], site: str = "heads", batch_size: int = 32,
            use_cache: bool = True) -> dict[int, torch.Tensor]:
    """Activation at the last token of every text, per layer: ``{layer: [n_texts, heads, dim]}`` (float32)."""
    for layer in layers:
        lm.spec.check_layer(layer)
    root = activation_cache_dir()
    dtype = str(lm.model.dtype)
    paths = {layer: root / f"{cache_key(lm.identity, dtype, site, layer, texts)}.safetensors" for layer in layers}
    result = {}
    if use_cache:
        result = {layer: load_file(p)["acts"] for layer, p in paths.items() if p.exists()}
    todo = [layer for layer in layers if layer not in result]
    if todo:
        fresh = _compute(lm, texts, todo, site, batch_size)
        root.mkdir(parents=True, exist_ok=True)
        for layer, acts in fresh.items():
            if use_cache:
                tmp = paths[layer].with_suffix(".tmp")
                save_file({"acts": acts.contiguous()}, str(tmp), metadata={"model": lm.identity, "site": site,
                                                                          "layer": str(layer)})
                os.replace(tmp, paths[layer])
            result[layer] = acts
    return result


def qa_text(question: str, answer: str) -> str:
    """The capture prompt of ITI and FLORAIN: ``"Q: {question} A: {answer}"``."""
    return f"Q: {question} A: {answer}"


def qa_end_q_text(question: str, answer: str, next_question: str) -> str:
    """ITI's σ-bank prompt (its ``tqa_gen_end_q`` features): ``"Q: {question} A: {answer} Q: {next_question}"``."""
    return f"Q: {question} A: {answer} Q: {next_question}"

