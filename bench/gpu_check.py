"""GPU check for paper-scale models: speed of the harness's hot paths and correctness of its hooks on a device.

Needs only torch, transformers (and numpy, which they pull in) and this repository: no Hub access, no tokenizer,
no lm-eval, rich, typer or pandas. A Llama-7B-shaped model (32 layers, hidden 4096, 32 heads × 128, intermediate
11008, vocab 32000) is built with seeded random weights directly on the device in bf16, and fed random token ids.

Measured (median of a few timed repeats after a warm-up, synchronised around each timing; every part is time-boxed):

* greedy generation tokens/s at batch 1, 16 and 64 (300-token prompt, 64 new tokens, every row runs every step):
  plain, with a FLORAIN hook and with an ITI hook on all heads of one layer (last position of every call);
* MC scoring answers/s through ``bench.scoring.answer_logprobs`` (shared 250-token prefix, 100 questions of ~20
  tokens, 7 answers of ~12 tokens each: the prefix run once, each question and its answers one row), plain, FLORAIN
  and ITI;
* activation capture of 6,000 answers (~64 tokens) at the ``heads`` site of one layer, last token, as
  ``bench.capture`` does it (the forward stops after the recorded layer);
* FLORAIN's fit on 32 heads × 128 dims, k = 32, 6,000 random samples: the training loop on the device (seconds per
  epoch, extrapolated to the default 1,000 epochs) and the library's ``fit_florain`` as the harness runs it (CPU);
* checks: a hook fires on every decoding step and is gone afterwards; FLORAIN and ITI edits computed in bf16 on the
  device agree with CPU fp32 on a tiny Llama within a relative tolerance (``BF16_RTOL``).

Run on a GPU machine (under 8 minutes on an H200)::

    python -m bench.gpu_check --out results/gpu-check
    cp results/gpu-check/gpu_check.md results/perf-gpu.md

``--device cpu --tiny`` runs the same code path on a tiny Llama in fp32 (seconds; the test suite does this).
The exit code is 1 when a check fails or a part raises, 2 when the device is unavailable.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime as _dt
import json
import math
import platform
import statistics
import sys
import time
import traceback
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from baselines.iti import DEFAULT_ALPHA, iti_shift
from baselines.shift import AdditiveShift
from bench.models import REGISTRY, LoadedModel
from bench.scoring import Encoded, answer_logprobs
from bench.sites import hooked, recorded, site_module
from bench.spec import ModelSpec
from florain import FlorainConfig, LowRankHeadMap, fit_florain, resolve_lambda
from florain.region import Regions, build_regions, pooled_covariance, shrink
from florain.train import per_head_loss, training_pairs

#: Packages the check must never import (the GPU machine does not have them).
OPTIONAL_PACKAGES = ("rich", "typer", "pandas", "lm_eval", "datasets", "sklearn")
#: Imported by transformers when installed; listed in the report for information only.
INFO_PACKAGES = ("accelerate", "scipy", "numpy", "safetensors")
#: Relative error ||bf16 − fp32|| / ||fp32|| allowed for edited activations and logits: bf16 keeps 8 significant
#: bits (unit roundoff 2^-9 ≈ 2e-3); a few roundings through two layers stay well below 2e-2.
BF16_RTOL = 2e-2
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SITE = "heads"
REQUIRED_CHECKS = ("bf16_agreement", "hook_every_step", "hooks_removed")
ANSWERS_PER_QUESTION = 6  # fit data: 3 desirable + 3 undesirable answers per question


@dataclass(frozen=True)
class Sizes:
    """Model shape and workload of one mode."""

    layers: int
    hidden: int
    heads: int
    head_dim: int
    intermediate: int
    vocab: int
    layer: int  # where the edits and the capture sit
    gen_batches: tuple[int, ...]
    prompt_tokens: int
    new_tokens: int
    repeats: int
    mc_prefix: int
    mc_questions: int
    mc_question_tokens: int
    mc_answers: int
    mc_answer_tokens: int
    mc_batch: int
    capture_answers: int
    capture_tokens: int
    capture_batch: int
    fit_samples: int
    fit_val_samples: int
    fit_epochs: int
    lib_fit_epochs: int
    rank: int
    budget_s: float  # time box of each timed part (one repeat may overrun it)


FULL = Sizes(layers=32, hidden=4096, heads=32, head_dim=128, intermediate=11008, vocab=32000,
             layer=REGISTRY["llama-7b"].default_layer or 11, gen_batches=(1, 16, 64), prompt_tokens=300,
             new_tokens=64, repeats=3, mc_prefix=250, mc_questions=100, mc_question_tokens=20, mc_answers=7,
             mc_answer_tokens=12, mc_batch=16, capture_answers=6000, capture_tokens=64, capture_batch=32,
             fit_samples=6000, fit_val_samples=1500, fit_epochs=20, lib_fit_epochs=3, rank=32, budget_s=60.0)
TINY = Sizes(layers=2, hidden=64, heads=4, head_dim=16, intermediate=128, vocab=512, layer=1, gen_batches=(1, 4),
             prompt_tokens=40, new_tokens=8, repeats=2, mc_prefix=30, mc_questions=10, mc_question_tokens=8,
             mc_answers=7, mc_answer_tokens=6, mc_batch=16, capture_answers=200, capture_tokens=24,
             capture_batch=32, fit_samples=200, fit_val_samples=60, fit_epochs=5, lib_fit_epochs=5, rank=8,
             budget_s=10.0)

_T0 = time.perf_counter()


def _log(message: str) -> None:
    """One progress line on stderr, stamped with the seconds since the module was imported."""
    print(f"[gpu-check {time.perf_counter() - _T0:7.1f}s] {message}", file=sys.stderr, flush=True)


def _sync(device: torch.device) -> None:
    """Wait for the device's queued work (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds ``fn`` takes, with the device synchronised before and after."""
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _rounds(labels: list[str], run: Callable[[str], float], repeats: int, budget_s: float) -> dict[str, list[float]]:
    """Up to ``repeats`` rounds of ``run(label)`` over all labels in turn (alternating, so drift hits each label
    alike); stops early once ``budget_s`` is spent, after at least one round. Returns seconds per label."""
    seconds: dict[str, list[float]] = {label: [] for label in labels}
    deadline = time.perf_counter() + budget_s
    for _ in range(repeats):
        for label in labels:
            seconds[label].append(run(label))
        if time.perf_counter() > deadline:
            break
    return seconds


def _random_ids(gen: torch.Generator, shape: tuple[int, ...], vocab: int) -> torch.Tensor:
    """Token ids avoiding the special ids 0-2 (pad, bos, eos)."""
    return torch.randint(3, vocab, shape, generator=gen)


# --------------------------------------------------------------------------- model and edits


def build_model(sizes: Sizes, device: torch.device, dtype: torch.dtype, seed: int, name: str) -> LoadedModel:
    """A seeded random Llama built directly on ``device`` in ``dtype`` (no fp32 copy on the CPU first)."""
    config = LlamaConfig(vocab_size=sizes.vocab, hidden_size=sizes.hidden, intermediate_size=sizes.intermediate,
                         num_hidden_layers=sizes.layers, num_attention_heads=sizes.heads,
                         num_key_value_heads=sizes.heads, head_dim=sizes.head_dim, max_position_embeddings=2048,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.eval()
    model.requires_grad_(False)
    # Nothing here tokenizes: the scorer only reads pad_token_id.
    tokenizer = types.SimpleNamespace(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LoadedModel(model, tokenizer, ModelSpec.from_model(model), name,  # type: ignore[arg-type]
                       f"{name} (random weights, seed {seed})", sizes.layer)


def make_edits(acts: torch.Tensor, rank: int, seed: int) -> dict[str, nn.Module]:
    """A FLORAIN map with random parameters and ITI's shift (all heads) from ``acts: [n, H, D]`` with random
    labels; fp32 parameters, as the harness keeps them (``Intervention.applied`` moves them, never casts)."""
    heads, dim = acts.shape[1:]
    gen = torch.Generator().manual_seed(seed)
    florain = LowRankHeadMap(heads, dim, rank, generator=gen)
    with torch.no_grad():
        florain.B.normal_(0.0, 0.5, generator=gen)
        florain.s.normal_(0.0, float(acts.float().std()), generator=gen)
    labels = torch.randperm(len(acts), generator=gen) % 2
    iti = AdditiveShift(iti_shift(acts.float(), labels, list(range(heads)), DEFAULT_ALPHA))
    return {"florain": florain.requires_grad_(False), "iti": iti}


def _edit_context(lm: LoadedModel, edits: dict[str, nn.Module], label: str,
                  positions: object = "last") -> contextlib.AbstractContextManager:
    """The hook of ``edits[label]`` at the check's layer (``plain``: none)."""
    if label == "plain":
        return contextlib.nullcontext()
    return hooked(lm.model, lm.spec, lm.default_layer, SITE, edits[label], positions)  # type: ignore[arg-type]


class HookedEdit:
    """The part of ``bench.interventions.Intervention`` that the scorer uses (that module imports scipy)."""

    position_policy = "task"

    def __init__(self, layer: int, edit: nn.Module):
        self.layer, self.edit = layer, edit

    @contextlib.contextmanager
    def applied(self, lm: LoadedModel, positions: object = "all") -> Iterator[None]:
        """The edit hooked at ``positions`` for the duration of the block."""
        with hooked(lm.model, lm.spec, self.layer, SITE, self.edit, positions):  # type: ignore[arg-type]
            yield


class CountingEdit(nn.Module):
    """The identity edit, counting its calls and the rows it sees."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.rows = 0

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        """Count the call and return ``a`` unchanged."""
        self.calls += 1
        self.rows += a.shape[0]
        return a


# --------------------------------------------------------------------------- timed parts


def _generate(lm: LoadedModel, ids: torch.Tensor, new_tokens: int) -> None:
    """Greedy decoding of exactly ``new_tokens`` tokens for every row (EOS suppressed by ``min_new_tokens``)."""
    out = lm.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                            min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    if out.shape[1] - ids.shape[1] != new_tokens:
        raise RuntimeError(f"generated {out.shape[1] - ids.shape[1]} tokens instead of {new_tokens}")


def part_generation(lm: LoadedModel, sizes: Sizes, edits: dict[str, nn.Module], device: torch.device,
                    seed: int) -> dict:
    """Greedy generation tokens/s per batch size: plain and with each edit hooked at the last position."""
    gen = torch.Generator().manual_seed(seed)
    labels = ["plain", *edits]
    result: dict = {"prompt_tokens": sizes.prompt_tokens, "new_tokens": sizes.new_tokens, "layer": sizes.layer,
                    "positions": "last", "batches": {}}
    for batch in sizes.gen_batches:
        ids = _random_ids(gen, (batch, sizes.prompt_tokens), sizes.vocab).to(device)

        def run(label: str, ids: torch.Tensor = ids, tokens: int = sizes.new_tokens) -> float:
            with _edit_context(lm, edits, label):
                return _timed(lambda: _generate(lm, ids, tokens), device)

        for label in labels:  # warm-up: allocations, kernel selection
            with _edit_context(lm, edits, label):
                _generate(lm, ids, 2)
        seconds = _rounds(labels, run, sizes.repeats, sizes.budget_s / len(sizes.gen_batches))
        row = {f"{label}_tok_s": batch * sizes.new_tokens / statistics.median(s) for label, s in seconds.items()}
        for label in edits:
            row[f"{label}_slowdown_pct"] = 100 * (row["plain_tok_s"] / row[f"{label}_tok_s"] - 1)
        row["seconds"] = seconds
        result["batches"][str(batch)] = row
        _log(f"  generation batch {batch}: " + ", ".join(f"{k} {row[f'{k}_tok_s']:.1f} tok/s" for k in labels))
    return result


def mc_sequences(sizes: Sizes, seed: int) -> list[Encoded]:
    """Random-id MC texts: one shared prefix, then per question its tokens and several answers."""
    gen = torch.Generator().manual_seed(seed)

    def length(n: int) -> int:
        return int(torch.randint(max(1, n - n // 4), n + n // 4 + 1, (1,), generator=gen))

    prefix = _random_ids(gen, (sizes.mc_prefix,), sizes.vocab).tolist()
    seqs = []
    for _ in range(sizes.mc_questions):
        context = prefix + _random_ids(gen, (length(sizes.mc_question_tokens),), sizes.vocab).tolist()
        for _ in range(sizes.mc_answers):
            answer = _random_ids(gen, (length(sizes.mc_answer_tokens),), sizes.vocab).tolist()
            seqs.append(Encoded(context + answer, list(range(len(context), len(context) + len(answer)))))
    return seqs


def part_mc(lm: LoadedModel, sizes: Sizes, edits: dict[str, nn.Module], device: torch.device, seed: int) -> dict:
    """Answers/s of the prefix-cached scorer, plain and with each edit on the answer tokens."""
    seqs = mc_sequences(sizes, seed)
    interventions = {"plain": None, **{k: HookedEdit(sizes.layer, e) for k, e in edits.items()}}
    scores: dict[str, list[float]] = {}

    def run(label: str) -> float:
        def score() -> None:
            scores[label] = answer_logprobs(lm, seqs, interventions[label], batch_size=sizes.mc_batch)

        return _timed(score, device)

    answer_logprobs(lm, seqs[: 2 * sizes.mc_answers], None, batch_size=sizes.mc_batch)  # warm-up
    seconds = _rounds(list(interventions), run, sizes.repeats, sizes.budget_s)
    if not all(math.isfinite(v) for s in scores.values() for v in s):
        raise FloatingPointError("a non-finite answer log-probability")
    result: dict = {"prefix_tokens": sizes.mc_prefix, "questions": sizes.mc_questions,
                    "answers": len(seqs), "answers_per_question": sizes.mc_answers,
                    "mean_tokens": statistics.mean(len(s.ids) for s in seqs), "batch_size": sizes.mc_batch,
                    "seconds": seconds}
    for label, s in seconds.items():
        result[f"{label}_answers_per_s"] = len(seqs) / statistics.median(s)
    _log("  mc: " + ", ".join(f"{k} {result[f'{k}_answers_per_s']:.1f} answers/s" for k in interventions))
    return result


class _StopForward(Exception):
    """Raised after the recorded layer: later layers and the LM head are skipped (as ``bench.capture`` does)."""


def _stop(_module: nn.Module, _args: object, _out: object) -> None:
    """Forward hook that ends the forward pass."""
    raise _StopForward


def _capture_batch(lm: LoadedModel, ids: torch.Tensor, lengths: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Last-token ``heads`` activations ``[batch, H, D]`` (fp32, CPU) of right-padded ``ids``."""
    spec, layer = lm.spec, lm.default_layer
    mask = (torch.arange(ids.shape[1]) < lengths[:, None]).long()
    stop = site_module(lm.model, spec, layer, SITE).register_forward_hook(_stop)
    try:
        with torch.no_grad(), recorded(lm.model, spec, [layer], SITE) as store:
            with contextlib.suppress(_StopForward):
                lm.model.model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
    finally:
        stop.remove()
    rows = store[layer]
    acts = rows[torch.arange(len(ids), device=rows.device), (lengths - 1).to(rows.device)].float().cpu()
    return acts.reshape(len(ids), *spec.site_shape(SITE))


def part_capture(lm: LoadedModel, sizes: Sizes, device: torch.device, seed: int, keep: dict) -> dict:
    """Capture time for ``capture_answers`` texts of ~``capture_tokens`` tokens, batched by length as the harness
    does; time-boxed (the time for all answers is then extrapolated). ``keep["acts"]``: the activations."""
    gen = torch.Generator().manual_seed(seed)
    n, t = sizes.capture_answers, sizes.capture_tokens
    lengths = torch.randint(t - t // 4, t + t // 4 + 1, (n,), generator=gen).sort().values
    ids = _random_ids(gen, (n, int(lengths.max())), sizes.vocab)
    out = torch.empty(n, *lm.spec.site_shape(SITE))
    _capture_batch(lm, ids[: sizes.capture_batch], lengths[: sizes.capture_batch], device)  # warm-up
    deadline, done = time.perf_counter() + sizes.budget_s, 0
    _sync(device)
    start = time.perf_counter()
    for lo in range(0, n, sizes.capture_batch):
        hi = min(lo + sizes.capture_batch, n)
        width = int(lengths[hi - 1])
        out[lo:hi] = _capture_batch(lm, ids[lo:hi, :width], lengths[lo:hi], device)
        done = hi
        if time.perf_counter() > deadline:
            break
    seconds = time.perf_counter() - start
    if not torch.isfinite(out[:done]).all():
        raise FloatingPointError("non-finite captured activation")
    keep["acts"] = out[:done]
    result = {"answers": n, "answers_timed": done, "mean_tokens": float(lengths.float().mean()),
              "batch_size": sizes.capture_batch, "layer": sizes.layer, "site": SITE, "seconds": seconds,
              "seconds_all_answers": seconds * n / done, "answers_per_s": done / seconds}
    _log(f"  capture: {done} answers in {seconds:.2f} s ({result['answers_per_s']:.0f} answers/s)")
    return result


def fit_data(n: int, heads: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random activations ``[n', H, D]`` (n' = n rounded down to whole questions), labels and question ids: each
    question has its own offset and 3 desirable answers shifted along a common direction from 3 undesirable."""
    gen = torch.Generator().manual_seed(seed)
    questions = max(2, n // ANSWERS_PER_QUESTION)
    groups = torch.arange(questions).repeat_interleave(ANSWERS_PER_QUESTION)
    labels = (torch.arange(len(groups)) % ANSWERS_PER_QUESTION < ANSWERS_PER_QUESTION // 2).long()
    offset = torch.randn(questions, heads, dim, generator=gen)
    direction = torch.randn(heads, dim, generator=gen)
    acts = offset[groups] + 0.5 * labels[:, None, None] * direction + torch.randn(len(groups), heads, dim, generator=gen)
    return acts, labels, groups


def _regions(train: tuple, val: tuple, cfg: FlorainConfig) -> tuple[Regions, Regions]:
    """Training and validation regions built as ``fit_florain`` builds them (the training fold's Σ and μ⁺ − μ⁻)."""
    acts, labels, groups = train
    pos = labels.bool()
    kwargs = dict(alpha=cfg.alpha, lam=resolve_lambda(acts, cfg), shrinking=cfg.shrinking,
                  covariance=shrink(pooled_covariance(acts, labels, groups), cfg.beta),
                  global_direction=acts[pos].double().mean(0) - acts[~pos].double().mean(0),
                  extrapolation=cfg.extrapolation)
    return build_regions(acts, labels, groups, **kwargs), build_regions(*val, **kwargs)


def _on(regions: Regions, device: torch.device) -> Regions:
    """The regions' tensors the loss reads, moved to ``device``."""
    return dataclasses.replace(regions, centres=regions.centres.to(device), precision=regions.precision.to(device),
                               rho=regions.rho.to(device))


def _device_epochs(x: torch.Tensor, owner: torch.Tensor, reg: Regions, xv: torch.Tensor, vowner: torch.Tensor,
                   vreg: Regions, cfg: FlorainConfig, device: torch.device, budget_s: float) -> list[float]:
    """``fit_map``'s loop on ``device`` (Adam on the summed loss, validation and per-head best-epoch state after each
    epoch); returns the seconds of each epoch run (stops once ``budget_s`` is spent)."""
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    heads, dim = x.shape[1:]
    mapping = LowRankHeadMap(heads, dim, cfg.rank, generator=torch.Generator().manual_seed(cfg.seed)).to(device)
    opt = torch.optim.Adam(mapping.parameters(), lr=cfg.lr)
    best = torch.full((heads,), math.inf, device=device)
    best_state = copy.deepcopy(mapping.state_dict())
    times: list[float] = []
    deadline = time.perf_counter() + budget_s
    for _ in range(cfg.epochs):
        _sync(device)
        start = time.perf_counter()
        for idx in torch.randperm(len(x), generator=gen, device=device).split(cfg.batch_size):
            loss = per_head_loss(mapping, x[idx], owner[idx], reg)
            opt.zero_grad(set_to_none=True)
            loss.sum().backward()
            opt.step()
        with torch.no_grad():
            val = sum(per_head_loss(mapping, xv[i], vowner[i], vreg).sum(0)
                      for i in torch.arange(len(xv), device=device).split(1024)) / len(xv)
        improved = val < best
        best = torch.where(improved, val, best)
        for name, value in mapping.state_dict().items():
            best_state[name][improved] = value[improved]
        if not torch.isfinite(val).all():
            raise FloatingPointError("device fit diverged")
        _sync(device)
        times.append(time.perf_counter() - start)
        if time.perf_counter() > deadline:
            break
    return times


def part_fit(sizes: Sizes, device: torch.device, seed: int) -> dict:
    """FLORAIN's fit on random activations: the training loop on ``device`` and the library's ``fit_florain``."""
    heads, dim = sizes.heads, sizes.head_dim
    train = fit_data(sizes.fit_samples, heads, dim, seed)
    val = fit_data(sizes.fit_val_samples, heads, dim, seed + 1)
    cfg = FlorainConfig(rank=sizes.rank, epochs=sizes.fit_epochs, seed=seed)
    start = time.perf_counter()
    reg, vreg = _regions(train, val, cfg)
    rows, owner = training_pairs(train[2], reg)
    vrows, vowner = training_pairs(val[2], vreg)
    regions_s = time.perf_counter() - start
    times = _device_epochs(train[0][rows].to(device), owner.to(device), _on(reg, device), val[0][vrows].to(device),
                           vowner.to(device), _on(vreg, device), cfg, device, sizes.budget_s / 2)
    per_epoch = statistics.median(times[1:] or times)  # the first epoch includes warm-up
    default_epochs = FlorainConfig().epochs
    result: dict = {"heads": heads, "head_dim": dim, "rank": sizes.rank, "train_samples": len(rows),
                    "val_samples": len(vrows), "batch_size": cfg.batch_size, "regions_cpu_s": regions_s,
                    "device": {"epochs_timed": len(times), "epoch_seconds": times, "seconds_per_epoch": per_epoch,
                               "default_epochs": default_epochs,
                               "extrapolated_s": regions_s + per_epoch * default_epochs}}
    result["library_cpu"] = _library_fit(train, val, sizes, seed, default_epochs)
    _log(f"  fit: device {per_epoch:.3f} s/epoch, library (CPU) "
         f"{result['library_cpu']['seconds_per_epoch']:.3f} s/epoch")
    return result


class _TimeUp(Exception):
    """Ends a time-boxed library fit early."""


def _library_fit(train: tuple, val: tuple, sizes: Sizes, seed: int, default_epochs: int) -> dict:
    """``fit_florain`` as the harness calls it (CPU tensors, so on the CPU), for a few epochs; stopped after the
    second epoch once half the part's time box is spent."""
    stamps: list[float] = []
    cfg = FlorainConfig(rank=sizes.rank, epochs=sizes.lib_fit_epochs, seed=seed)
    start = time.perf_counter()

    def progress(*_: float) -> None:
        stamps.append(time.perf_counter())
        if len(stamps) >= 2 and stamps[-1] - start > sizes.budget_s / 2:
            raise _TimeUp

    with contextlib.suppress(_TimeUp):
        fit_florain(*train, *val, cfg, progress=progress)
    total = time.perf_counter() - start
    epochs = [b - a for a, b in zip([start, *stamps], stamps)]
    per_epoch = statistics.median(epochs[1:] or epochs)  # the first epoch includes building the regions
    return {"epochs_timed": len(epochs), "seconds": total, "seconds_per_epoch": per_epoch,
            "threads": torch.get_num_threads(), "epoch_seconds": epochs,
            "extrapolated_s": epochs[0] + per_epoch * (default_epochs - 1)}


# --------------------------------------------------------------------------- checks


def check_hooks(lm: LoadedModel, device: torch.device, seed: int, new_tokens: int = 8, batch: int = 2) -> dict:
    """A counting edit hooked at the last position fires once per forward call of a generation (prefill, then each
    generated token fed back) on every row, and is gone afterwards (no leftover hook; a later forward leaves the
    count still)."""
    ids = _random_ids(torch.Generator().manual_seed(seed), (batch, 16), lm.model.config.vocab_size).to(device)
    module = site_module(lm.model, lm.spec, lm.default_layer, SITE)
    hooks_before = len(module._forward_pre_hooks) + len(module._forward_hooks)
    forwards = [0]
    counter = lm.model.model.register_forward_hook(lambda *_: forwards.__setitem__(0, forwards[0] + 1))
    edit = CountingEdit()
    try:
        with hooked(lm.model, lm.spec, lm.default_layer, SITE, edit, "last"):
            hooks_during = len(module._forward_pre_hooks) + len(module._forward_hooks)
            _generate(lm, ids, new_tokens)
    finally:
        counter.remove()
    calls, rows = edit.calls, edit.rows
    with torch.no_grad():
        lm.model(input_ids=ids, use_cache=False)
    hooks_after = len(module._forward_pre_hooks) + len(module._forward_hooks)
    fires = calls == forwards[0] == new_tokens and rows == batch * calls
    removed = edit.calls == calls and hooks_after == hooks_before and hooks_during == hooks_before + 1
    return {
        "hook_every_step": {"passed": fires, "new_tokens": new_tokens, "batch": batch, "forward_calls": forwards[0],
                            "hook_calls": calls, "rows_edited": rows,
                            "expected": f"{new_tokens} calls (prefill + {new_tokens - 1} decoding steps), "
                                        f"{batch} rows each"},
        "hooks_removed": {"passed": removed, "hooks_before": hooks_before, "hooks_during": hooks_during,
                          "hooks_after": hooks_after, "calls_after_later_forward": edit.calls},
    }


def _run_edited(lm: LoadedModel, edit: nn.Module | None, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``heads`` activations after ``edit`` (on every position) and the logits, both fp32 on the CPU."""
    model, spec, layer = lm.model, lm.spec, lm.default_layer
    ctx = contextlib.nullcontext() if edit is None else hooked(model, spec, layer, SITE, edit, "all")
    with torch.no_grad(), ctx, recorded(model, spec, [layer], SITE) as store:  # recorded after the edit's hook
        logits = model(input_ids=ids, use_cache=False).logits
    return store[layer].float().cpu(), logits.float().cpu()


def _errors(test: torch.Tensor, ref: torch.Tensor) -> dict:
    """Max absolute and relative (Frobenius) error of ``test`` against ``ref``."""
    diff = (test - ref).double()
    return {"max_abs": float(diff.abs().max()), "rel": float(diff.norm() / ref.double().norm().clamp_min(1e-30))}


def check_agreement(device: torch.device, dtype: torch.dtype, seed: int, rtol: float = BF16_RTOL) -> dict:
    """FLORAIN and ITI edits in ``dtype`` on ``device`` against CPU fp32 on a tiny Llama with the same weights:
    the edit alone (same inputs), the edited activations inside the model and the final logits."""
    ref = build_model(TINY, torch.device("cpu"), torch.float32, seed, "agreement-fp32")
    test = build_model(TINY, device, dtype, seed, "agreement-test")
    test.model.load_state_dict(ref.model.state_dict())
    ids = _random_ids(torch.Generator().manual_seed(seed), (4, 32), TINY.vocab)
    base, logits32 = _run_edited(ref, None, ids)
    _, logits_test = _run_edited(test, None, ids.to(device))
    acts = base.reshape(-1, *ref.spec.site_shape(SITE))
    result: dict = {"device": str(device), "dtype": str(dtype).removeprefix("torch."), "reference": "cpu float32",
                    "rtol": rtol, "error": "||test - reference|| / ||reference|| (Frobenius)",
                    "model": {"layers": TINY.layers, "heads": TINY.heads, "head_dim": TINY.head_dim},
                    "unedited": {"logits": _errors(logits_test, logits32)}}
    for name, edit in make_edits(acts, TINY.rank, seed).items():
        edited32, out32 = _run_edited(ref, edit, ids)
        on_device = copy.deepcopy(edit).to(device)
        edited, out = _run_edited(test, on_device, ids.to(device))
        low = acts.to(dtype)
        with torch.no_grad():
            alone = on_device(low.to(device)).float().cpu()
            alone_ref = edit(low.float())
        result[name] = {"edit_only": _errors(alone, alone_ref), "edited_acts": _errors(edited, edited32),
                        "logits": _errors(out, out32),
                        "edit_size": float((edited32 - base).norm() / base.norm())}
    errors = [result["unedited"]["logits"]["rel"]]
    errors += [e["rel"] for key in ("florain", "iti") for k, e in result[key].items() if k != "edit_size"]
    result["max_rel"] = max(errors)
    result["passed"] = result["max_rel"] <= rtol and all(r["edit_size"] > 1e-3 for r in
                                                          (result["florain"], result["iti"]))
    return result


# --------------------------------------------------------------------------- report


@contextlib.contextmanager
def blocked(packages: tuple[str, ...]) -> Iterator[list[str]]:
    """Make ``import`` of the packages not yet imported fail, as on a machine without them (``bench.progress``
    then draws no bar; any other import of them fails its part); undone on exit. Yields the blocked names."""
    names = [p for p in packages if p not in sys.modules]
    for name in names:
        sys.modules[name] = None  # type: ignore[assignment]
    try:
        yield names
    finally:
        for name in names:
            if sys.modules.get(name, 0) is None:
                del sys.modules[name]


def _imported(packages: tuple[str, ...]) -> list[str]:
    """Which of ``packages`` are imported (top-level names)."""
    return sorted({m.split(".")[0] for m, mod in list(sys.modules.items())
                   if mod is not None and m.split(".")[0] in packages})


class Report:
    """The result being built; written to ``gpu_check.json`` and ``gpu_check.md`` after every part."""

    def __init__(self, out: Path, meta: dict):
        self.out = out
        self.start = time.perf_counter()
        self.data: dict = {"meta": meta, "parts": {}, "checks": {}, "errors": {}}

    def run(self, section: str, name: str, fn: Callable[[], dict]) -> dict | None:
        """Run one part; its result (or its error) is recorded and the files rewritten."""
        _log(f"{name}: start")
        start = time.perf_counter()
        try:
            result = fn()
        except Exception as err:  # a part that fails is recorded; the others still run
            _log(f"{name}: FAILED: {type(err).__name__}: {err}")
            self.data["errors"][name] = f"{type(err).__name__}: {err}\n{traceback.format_exc(limit=6)}"
            result = None
        else:
            wall = time.perf_counter() - start
            if section == "checks":  # one part may run several checks
                self.data["checks"].update({k: {**v, "wall_s": wall} for k, v in result.items()})
            else:
                self.data["parts"][name] = {**result, "wall_s": wall}
            _log(f"{name}: done in {time.perf_counter() - start:.1f} s")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        self.write()
        return result

    @property
    def passed(self) -> bool:
        """Every part ran and every check ran and passed."""
        checks = self.data["checks"]
        return (not self.data["errors"] and set(REQUIRED_CHECKS) <= set(checks)
                and all(c["passed"] for c in checks.values()))

    def write(self) -> None:
        """Rewrite both files with what is known so far."""
        self.data["total_wall_s"] = time.perf_counter() - self.start
        self.data["passed"] = self.passed
        self.data["optional_imported"] = _imported(OPTIONAL_PACKAGES)
        self.data["info_imported"] = _imported(INFO_PACKAGES)
        if torch.cuda.is_available():
            self.data["meta"]["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        (self.out / "gpu_check.json").write_text(json.dumps(self.data, indent=2, default=str) + "\n")
        (self.out / "gpu_check.md").write_text(markdown(self.data))


def _md_generation(part: dict) -> list[str]:
    """The generation table."""
    edits = [k.removesuffix("_slowdown_pct") for k in next(iter(part["batches"].values())) if k.endswith("_pct")]
    lines = [f"## Greedy generation ({part['prompt_tokens']}-token prompt, {part['new_tokens']} new tokens, "
             f"edits at layer {part['layer']}, last position)", "",
             "| batch | plain tok/s | " + " | ".join(f"{e} tok/s | {e} slowdown" for e in edits) + " | repeats |",
             "|---:|---:|" + "---:|---:|" * len(edits) + "---:|"]
    for batch, row in part["batches"].items():
        cells = " | ".join(f"{row[f'{e}_tok_s']:.1f} | {row[f'{e}_slowdown_pct']:+.1f}%" for e in edits)
        lines.append(f"| {batch} | {row['plain_tok_s']:.1f} | {cells} | {len(row['seconds']['plain'])} |")
    return lines


def _md_parts(parts: dict) -> list[str]:
    """Sections for the timed parts that ran."""
    lines: list[str] = []
    if "generation" in parts:
        lines += [*_md_generation(parts["generation"]), ""]
    if "mc" in parts:
        mc = parts["mc"]
        rates = ", ".join(f"{k.removesuffix('_answers_per_s')} **{v:.1f}**" for k, v in mc.items()
                          if k.endswith("_answers_per_s"))
        lines += ["## MC scoring (shared prefix once, a question and its answers per row)", "",
                  f"{mc['answers']} answers ({mc['questions']} questions × {mc['answers_per_question']}, shared "
                  f"{mc['prefix_tokens']}-token prefix, {mc['mean_tokens']:.0f} tokens per text, batch "
                  f"{mc['batch_size']}): answers/s {rates}.", ""]
    if "capture" in parts:
        c = parts["capture"]
        lines += ["## Activation capture", "",
                  f"{c['answers_timed']} of {c['answers']} answers ({c['mean_tokens']:.0f} tokens, batch "
                  f"{c['batch_size']}, `{c['site']}` of layer {c['layer']}, last token): {c['seconds']:.2f} s, "
                  f"**{c['answers_per_s']:.0f} answers/s**; all {c['answers']}: {c['seconds_all_answers']:.1f} s.", ""]
    if "fit" in parts:
        f, d, lib = parts["fit"], parts["fit"]["device"], parts["fit"]["library_cpu"]
        lines += ["## FLORAIN fit", "",
                  f"{f['heads']} heads × {f['head_dim']} dims, k = {f['rank']}, {f['train_samples']} training and "
                  f"{f['val_samples']} validation samples (random), batch {f['batch_size']}; regions on the CPU "
                  f"{f['regions_cpu_s']:.2f} s.", "",
                  "| loop | epochs timed | s/epoch | extrapolated to "
                  f"{d['default_epochs']} epochs |", "|---|---:|---:|---:|",
                  f"| on the device | {d['epochs_timed']} | {d['seconds_per_epoch']:.3f} | {d['extrapolated_s']:.0f} s |",
                  f"| `fit_florain` (CPU, {lib['threads']} threads) | {lib['epochs_timed']} | "
                  f"{lib['seconds_per_epoch']:.3f} | {lib['extrapolated_s']:.0f} s |", ""]
    return lines


def _md_checks(data: dict) -> list[str]:
    """The checks table, the agreement errors and any part's error."""
    checks = data["checks"]
    lines = ["## Checks", "", "| check | result | details |", "|---|---|---|"]
    for name in ("hook_every_step", "hooks_removed"):
        if name in checks:
            c = checks[name]
            details = ", ".join(f"{k} {v}" for k, v in c.items() if k not in ("passed", "wall_s"))
            lines.append(f"| {name} | {'pass' if c['passed'] else 'FAIL'} | {details} |")
    if "bf16_agreement" in checks:
        a = checks["bf16_agreement"]
        lines.append(f"| bf16_agreement | {'pass' if a['passed'] else 'FAIL'} | {a['dtype']} on {a['device']} vs "
                     f"{a['reference']}, max relative error {a['max_rel']:.2e} ≤ tolerance {a['rtol']:g} |")
        lines += ["", "| edit | part | max abs error | relative error |", "|---|---|---:|---:|"]
        for edit in ("florain", "iti"):
            for part, e in a[edit].items():
                if isinstance(e, dict):
                    lines.append(f"| {edit} | {part} | {e['max_abs']:.2e} | {e['rel']:.2e} |")
        e = a["unedited"]["logits"]
        lines.append(f"| none | logits | {e['max_abs']:.2e} | {e['rel']:.2e} |")
    for name, err in data["errors"].items():
        lines.append(f"\n**{name} failed**: `{err.splitlines()[0]}`")
    return lines


def markdown(data: dict) -> str:
    """The report as Markdown."""
    m = data["meta"]
    s = m["model"]
    lines = [f"# GPU check ({m['mode']}): {s['layers']}-layer Llama with random weights", "",
             f"- device: {m['device_name']} (`{m['device']}`), torch {m['torch']}, transformers {m['transformers']}, "
             f"Python {m['python']}, dtype {m['dtype']}, attention `{m.get('attn_implementation', '?')}`",
             f"- model: {s['layers']} layers, hidden {s['hidden']}, {s['heads']} heads × {s['head_dim']}, "
             f"intermediate {s['intermediate']}, vocab {s['vocab']} ({m.get('parameters', 0) / 1e9:.2f} B parameters)",
             f"- started {m['started']}; total wall time **{data['total_wall_s']:.1f} s**"
             + (f"; peak GPU memory {m['peak_gpu_memory_gib']:.1f} GiB" if "peak_gpu_memory_gib" in m else ""),
             f"- result: **{'all checks passed' if data['passed'] else 'FAILED'}**; optional packages imported: "
             f"{', '.join(data['optional_imported']) or 'none'}", "",
             "Timings: median of the timed repeats after a warm-up, synchronised; each part time-boxed.", ""]
    return "\n".join(lines + _md_parts(data["parts"]) + _md_checks(data)) + "\n"


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="directory for gpu_check.json and gpu_check.md")
    parser.add_argument("--device", default="cuda", help="torch device (default: cuda)")
    parser.add_argument("--tiny", action="store_true", help="a tiny 2-layer Llama and small workloads (seconds)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default: bf16 on CUDA, else fp32")
    parser.add_argument("--repeats", type=int, help="timed repeats per measurement (default: 3, tiny 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: 1 with --tiny on the CPU, "
                                                    "where more only oversubscribe a shared machine; else torch's)")
    return parser.parse_args(argv)


def _meta(args: argparse.Namespace, sizes: Sizes, device: torch.device, dtype: torch.dtype) -> dict:
    """Device, versions, dtype, shapes and workload."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    return {"mode": "tiny" if args.tiny else "full", "device": str(device), "device_name": name,
            "torch": torch.__version__, "transformers": transformers.__version__,
            "cuda": torch.version.cuda, "python": platform.python_version(),
            "dtype": str(dtype).removeprefix("torch."), "seed": args.seed, "threads": torch.get_num_threads(),
            "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "model": {k: getattr(sizes, k) for k in ("layers", "hidden", "heads", "head_dim", "intermediate",
                                                     "vocab", "layer")},
            "workload": dataclasses.asdict(sizes), "bf16_rtol": BF16_RTOL}


def _build(report: Report, sizes: Sizes, device: torch.device, dtype: torch.dtype, seed: int, keep: dict) -> dict:
    """Build the model (``keep["lm"]``) and record its size and spec."""
    lm = build_model(sizes, device, dtype, seed, "tiny-llama" if sizes.layers == TINY.layers else "llama-7b-shaped")
    keep["lm"] = lm
    meta = report.data["meta"]
    meta["parameters"] = sum(p.numel() for p in lm.model.parameters())
    meta["attn_implementation"] = getattr(lm.model.config, "_attn_implementation", None)
    shape = (lm.spec.n_layers, lm.spec.n_heads, lm.spec.head_dim)
    return {"parameters": meta["parameters"], "spec": dataclasses.asdict(lm.spec),
            "matches_llama_7b_registry": shape == REGISTRY["llama-7b"].shape}


def main(argv: list[str] | None = None) -> int:
    """Run the check; 0 when every check passed and every part ran, 1 otherwise, 2 without the device."""
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: CUDA is not available here (use --device cpu --tiny for the CPU path)", file=sys.stderr)
        return 2
    sizes = TINY if args.tiny else FULL
    if args.repeats:
        sizes = dataclasses.replace(sizes, repeats=args.repeats)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    threads = args.threads or (1 if args.tiny and device.type == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    args.out.mkdir(parents=True, exist_ok=True)
    report = Report(args.out, _meta(args, sizes, device, dtype))
    with blocked(OPTIONAL_PACKAGES) as names:
        report.data["meta"]["blocked_packages"] = names
        _run_all(report, args.seed, sizes, device, dtype)
    _log(f"{'passed' if report.passed else 'FAILED'}; wrote {args.out / 'gpu_check.json'} and gpu_check.md "
         f"({report.data['total_wall_s']:.1f} s)")
    return 0 if report.passed else 1


def _edits(keep: dict, sizes: Sizes, seed: int, device: torch.device) -> dict[str, nn.Module]:
    """The timed parts' edits, made once on the device: ITI's shift from the captured activations (random ones
    if the capture failed) with random labels, and a random FLORAIN map of the run's rank."""
    if "edits" not in keep:
        sample = keep.get("acts", torch.randn(256, *keep["lm"].spec.site_shape(SITE)))[:1024]
        keep["edits"] = {k: e.to(device) for k, e in make_edits(sample, sizes.rank, seed).items()}
    return keep["edits"]


def _run_all(report: Report, seed: int, sizes: Sizes, device: torch.device, dtype: torch.dtype) -> None:
    """Every check and part in turn: the tiny-model agreement first, then the big model's."""
    check_dtype = dtype if dtype != torch.float32 else torch.bfloat16
    keep: dict = {}
    report.run("checks", "bf16_agreement",
               lambda: {"bf16_agreement": check_agreement(device, check_dtype, seed)})
    if report.run("parts", "build", lambda: _build(report, sizes, device, dtype, seed, keep)) is not None:
        lm = keep["lm"]
        report.run("checks", "hooks", lambda: check_hooks(lm, device, seed))
        report.run("parts", "capture", lambda: part_capture(lm, sizes, device, seed, keep))
        report.run("parts", "fit", lambda: part_fit(sizes, device, seed))
        report.run("parts", "generation", lambda: part_generation(lm, sizes, _edits(keep, sizes, seed, device),
                                                                  device, seed))
        report.run("parts", "mc", lambda: part_mc(lm, sizes, _edits(keep, sizes, seed, device), device, seed))
    report.write()


if __name__ == "__main__":
    sys.exit(main())
