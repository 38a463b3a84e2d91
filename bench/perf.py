"""Performance benchmarks (``make bench-perf``). Each implementation runs in its own subprocess, one after the
other on the same machine, so that its peak memory (max RSS) is its own; results go to ``results/perf.md`` and
``results/perf.json``.

* ``mc``: TruthfulQA MC1 + MC2 in lm-eval's prompt format, our scorer (the shared prefix once, each question and
  the trie of its answers as one row) vs lm-eval's own ``truthfulqa_mc1``/``truthfulqa_mc2`` tasks (through
  :class:`bench.lm_eval_plugin.InterventionLM`, i.e. HFLM with no intervention), with the per-question agreement,
  and the work each does (tokens fed, logit rows, attention pairs, FLOPs: ours counted by hooks during the timed
  run, lm-eval's from its requests' lengths), which bounds the speed-up any scorer of the same arithmetic can
  reach.
* ``gen``: greedy generation tokens/s with and without a FLORAIN hook, batch 1 and 16; plain and hooked rounds
  alternate and the median round is reported.
* ``decode``: greedy decoding tokens/s at batch 1/16/32/64 with a FLORAIN hook, HF ``generate`` (the earlier path)
  vs :func:`bench.decoding.decode`, against this machine's measured read-bandwidth and matrix-multiply bounds.
* ``protocol``: the full ``--task truthfulqa`` protocol for ``none``, ``caa``, ``florain`` and ``iti`` with the
  earlier code paths (``RunConfig.legacy_paths``) and the current ones: per-part seconds, ratios, identical answers,
  metric differences; a method is fitted once and both paths evaluate that fit. Each part's model work is counted
  (:func:`counted_parts`), which bounds the speed-up that running the same arithmetic faster could reach.
* ``fit``: the FLORAIN fit of all heads of one layer (both folds) batched over heads, vs a per-head sequential
  loop shaped like the released code (an explicit D×D matrix per sample, a validation pass and best-epoch
  bookkeeping per head and epoch).
"""

from __future__ import annotations

import json
import math
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch

from bench.runs import RunFolder


def _questions(data_dir: str | None, limit: int | None):
    from bench.data.truthfulqa import load_truthfulqa

    qs, _ = load_truthfulqa(data_dir)
    return qs[:limit] if limit else qs


def part_mc_ours(model: str, data_dir: str | None, limit: int | None, batch_size: int,
                 lm_eval_batch_size: int = 16) -> dict:
    """Our scorer in lm-eval prompt mode (``batch_size`` answers per pass): per-question MC1/MC2 and the wall time
    (model loading excluded), with lm-eval's work at ``lm_eval_batch_size`` texts per pass counted beside it."""
    from bench.models import load_model
    from bench.tasks.truthfulqa_mc import evaluate_mc

    qs = _questions(data_dir, limit)
    lm = load_model(model, device="cpu")
    with counted_work(lm) as work:
        t = time.perf_counter()
        recs = evaluate_mc(lm, qs, None, mode="lm-eval", batch_size=batch_size)
        seconds = time.perf_counter() - t
    return {"questions": len(qs), "answers": sum(len(r["logprobs"]) for r in recs), "batch_size": batch_size,
            "seconds": seconds, "per_question": {m: [r[m] for r in recs] for m in ("mc1", "mc2")},
            "work": work, "lm_eval_work": lm_eval_work(lm, qs, lm_eval_batch_size)}


def _weights(lm) -> dict[str, int]:
    """Multiply-adds per unit of work: per token fed (the decoder's weights), per logit row (the output head),
    per attention pair of a query and a key slot (the attention width, over all layers)."""
    body = lm.model.get_decoder()
    head = lm.model.get_output_embeddings()
    spec = lm.spec
    return {"token": sum(p.numel() for n, p in body.named_parameters() if "embed_tokens" not in n),
            "logit_row": head.weight.numel(), "pair": spec.n_layers * spec.n_heads * spec.head_dim * 2}


def _flops(work: dict, weights: dict) -> float:
    return 2.0 * (work["tokens"] * weights["token"] + work["logit_rows"] * weights["logit_row"]
                  + work["attention_pairs"] * weights["pair"])


@contextmanager
def counted_work(lm) -> Iterator[dict]:
    """Counts, while the block runs, what the model computes: token positions fed (padding included), logit rows,
    and query × key-slot pairs of attention (masked slots and a shared prefix's included: they are computed too);
    ``flops`` on exit. Tokens and pairs are counted per decoder layer run, in units of whole passes (a pass that
    skips layers, :func:`bench.sites.resumed`, counts the share it runs)."""
    from bench.attention import prefix_length

    work = {"forward_passes": 0, "tokens": 0, "logit_rows": 0, "attention_pairs": 0}
    current, layer_sums = {"tokens": 0, "attention_pairs": 0}, {"tokens": 0, "attention_pairs": 0}

    def body_pre(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        mask = kwargs.get("attention_mask")
        b, t = ids.shape
        work["forward_passes"] += 1
        current.update(tokens=b * t,
                       attention_pairs=b * t * ((mask.shape[-1] if mask is not None else t) + prefix_length()))

    def layer_pre(module, args):
        for key in layer_sums:
            layer_sums[key] += current[key]

    def head_post(module, args, out):
        work["logit_rows"] += out.shape[0] * out.shape[1]

    n = lm.spec.n_layers
    handles = [lm.model.get_decoder().register_forward_pre_hook(body_pre, with_kwargs=True),
               lm.model.get_output_embeddings().register_forward_hook(head_post),
               *(lm.spec.decoder_layer(lm.model, i).register_forward_pre_hook(layer_pre) for i in range(n))]
    try:
        yield work
    finally:
        for h in handles:
            h.remove()
        for key, total in layer_sums.items():
            work[key] = total // n if total % n == 0 else total / n
        work["flops"] = _flops(work, _weights(lm))


@contextmanager
def counted_parts(work: dict[str, dict]) -> Iterator[None]:
    """While the block runs, each task part's evaluation (every fold of every run) adds the work of the run's model
    (:func:`counted_work`) to ``work[part name]``; the judge's and other instruments' own models are not counted."""
    from bench.tasks.base import PARTS

    registered = dict(PARTS)

    def counting(part):
        def evaluate(state, k, items, iv):
            with counted_work(state.lm) as w:
                res = part.evaluate(state, k, items, iv)
            total = work.setdefault(part.name, {})
            for key, v in w.items():
                total[key] = total.get(key, 0) + v
            return res
        return replace(part, evaluate=evaluate)

    PARTS.update({name: counting(part) for name, part in registered.items()})
    try:
        yield
    finally:
        PARTS.update(registered)


def lm_eval_work(lm, questions, batch_size: int) -> dict:
    """lm-eval's work on the same MC requests, counted from their lengths: each (context, answer) pair run whole
    but its last token, sorted longest first into batches of ``batch_size`` padded to their longest, logits at
    every position (HFLM's loglikelihood path; our tokenisation of the same texts)."""
    from bench.tasks.truthfulqa_mc import mc_sequences

    lengths = sorted((len(s.ids) - 1 for s in mc_sequences(lm, questions, "lm-eval")[0]), reverse=True)
    work = {"forward_passes": 0, "tokens": 0, "logit_rows": 0, "attention_pairs": 0}
    for s in range(0, len(lengths), batch_size):
        batch = lengths[s:s + batch_size]
        work["forward_passes"] += 1
        work["tokens"] += len(batch) * batch[0]
        work["logit_rows"] += len(batch) * batch[0]
        work["attention_pairs"] += len(batch) * batch[0] * batch[0]
    work["flops"] = _flops(work, _weights(lm))
    return work


def part_mc_lmeval(model: str, data_dir: str | None, limit: int | None, batch_size: int) -> dict:
    """lm-eval's own truthfulqa_mc1/mc2 tasks on a local copy of the same questions (Hub layout)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from bench.lm_eval_plugin import InterventionLM, write_truthfulqa_tasks
    from bench.models import load_model

    qs = _questions(data_dir, limit)
    lm = load_model(model, device="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        names = write_truthfulqa_tasks(qs, tmp)
        t = time.perf_counter()
        out = lm_eval.simple_evaluate(model=InterventionLM(pretrained=lm, batch_size=batch_size), tasks=names,
                                      task_manager=TaskManager(include_path=tmp), log_samples=True)
        seconds = time.perf_counter() - t
    per_question = {}
    for name in names:
        samples = sorted(out["samples"][name], key=lambda s: s["doc_id"])
        per_question[name.rsplit("_", 1)[1]] = [float(s["acc"]) for s in samples]
    return {"questions": len(qs), "batch_size": batch_size, "seconds": seconds, "per_question": per_question,
            "lm_eval_version": lm_eval.__version__ if hasattr(lm_eval, "__version__") else None}


def bench_layer(lm) -> int:
    """The layer the timing parts edit: the model's paper layer, else the middle one (a registered model without
    a paper layer chooses its layer per fold in a run; a timing needs one fixed layer)."""
    return lm.default_layer if lm.default_layer is not None else lm.spec.n_layers // 2


def part_gen(model: str, data_dir: str | None, limit: int | None, new_tokens: int, rounds: int) -> dict:
    """Greedy generation tokens/s with and without a FLORAIN hook (policy: last prompt token + generated tokens).

    Plain and hooked rounds alternate on the same prompts; the median round of each is reported."""
    from bench.interventions import Intervention
    from bench.models import load_model
    from bench.prompts import INSTRUCTION, QA_PRIMER
    from florain import LowRankHeadMap

    lm = load_model(model, device="cpu")
    heads, dim = lm.spec.site_shape("heads")
    layer = bench_layer(lm)
    iv = Intervention("florain", "heads", {layer: LowRankHeadMap(heads, dim, 32, torch.Generator().manual_seed(0))},
                      {"heads": heads, "head_dim": dim})
    prompts = [f"{INSTRUCTION}\n\n{QA_PRIMER}\n\nQ: {q.question}\nA:" for q in _questions(data_dir, 16)]
    tok = lm.tokenizer
    out = {}
    for batch in (1, 16):
        enc = tok(prompts[:batch], return_tensors="pt", padding=True, padding_side="left")
        with torch.no_grad():  # warm-up (first-call allocations), not timed
            lm.model.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
        rates: dict[str, list[float]] = {"plain": [], "florain": []}
        for _ in range(rounds):
            for label in ("plain", "florain"):
                ctx = iv.applied(lm, positions="last") if label == "florain" else torch.no_grad()
                with torch.no_grad(), ctx:
                    t = time.perf_counter()
                    gen = lm.model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                            do_sample=False, pad_token_id=tok.pad_token_id)
                    seconds = time.perf_counter() - t
                rates[label].append((gen.shape[1] - enc["input_ids"].shape[1]) * gen.shape[0] / seconds)
        plain, hooked = statistics.median(rates["plain"]), statistics.median(rates["florain"])
        out[f"batch_{batch}"] = {"plain_tok_s": plain, "florain_tok_s": hooked,
                                 "slowdown_pct": 100 * (plain / hooked - 1), "rounds": rates}
    return {"new_tokens": new_tokens, "layer": layer, "rounds": rounds, **out}


def _fit_data(model: str, data_dir: str | None, limit: int | None):
    """Per fold: the layer's head activations, labels and groups, split into training and validation questions."""
    from bench.data.truthfulqa import make_folds
    from bench.methods import FitContext
    from bench.models import load_model

    lm = load_model(model, device="cpu")
    qs = _questions(data_dir, limit)
    layer = bench_layer(lm)
    folds = []
    for fold in make_folds(len(qs)):
        ctx = FitContext(lm, qs, fold, layer, "heads")
        acts_by, labels, groups = ctx.activations()
        acts = acts_by[layer].float()
        tr, va = ctx.split(groups, "train"), ctx.split(groups, "val")
        folds.append((acts[tr], labels[tr], groups[tr], acts[va], labels[va], groups[va]))
    return layer, folds


def part_fit_batched(model: str, data_dir: str | None, limit: int | None, epochs: int, compile: bool) -> dict:
    """``fit_florain``: all heads of the layer in one map and one Adam (the library's path)."""
    from florain import FlorainConfig, fit_florain

    layer, folds = _fit_data(model, data_dir, limit)
    cfg = FlorainConfig(epochs=epochs, compile=compile)
    t = time.perf_counter()
    n_train = 0
    for tr_a, tr_l, tr_g, va_a, va_l, va_g in folds:
        fitted = fit_florain(tr_a, tr_l, tr_g, va_a, va_l, va_g, cfg)
        n_train += fitted.n_train
    seconds = time.perf_counter() - t
    heads, dim = folds[0][0].shape[1:]
    return {"layer": layer, "heads": heads, "head_dim": dim, "rank": cfg.rank, "epochs": epochs,
            "compile": compile, "train_samples": n_train, "seconds": seconds}


def part_fit_loop(model: str, data_dir: str | None, limit: int | None, epochs: int) -> dict:
    """A per-head sequential loop shaped like the released code: for each head, its own regions, parameters and
    Adam; per mini-batch the D×D matrix L(a)Rᵀ of each sample; after each epoch a validation pass and the
    best-epoch checkpoint of that head. Same data, loss, epochs and batch size as the batched fit."""
    from florain import FlorainConfig, resolve_lambda
    from florain.region import build_regions
    from florain.train import training_pairs

    layer, folds = _fit_data(model, data_dir, limit)
    cfg = FlorainConfig(epochs=epochs)
    t = time.perf_counter()
    for tr_a, tr_l, tr_g, va_a, va_l, va_g in folds:
        lam = resolve_lambda(tr_a, cfg)
        pos = tr_l.bool()
        for h in range(tr_a.shape[1]):
            torch.manual_seed(cfg.seed)
            a_tr, a_va = tr_a[:, h : h + 1], va_a[:, h : h + 1]
            reg = build_regions(a_tr, tr_l, tr_g, alpha=cfg.alpha, lam=lam)
            gdir = a_tr[pos].double().mean(0) - a_tr[~pos].double().mean(0)
            vreg = build_regions(a_va, va_l, va_g, alpha=cfg.alpha, lam=lam, covariance=reg.covariance.double(),
                                 global_direction=gdir)
            rows, owner = training_pairs(tr_g, reg)
            vrows, vowner = training_pairs(va_g, vreg)
            _fit_one_head(a_tr[rows, 0], reg.centres[owner, 0], reg.precision[0], reg.rho[owner, 0],
                          a_va[vrows, 0], vreg.centres[vowner, 0], vreg.rho[vowner, 0], cfg)
    seconds = time.perf_counter() - t
    return {"layer": layer, "epochs": epochs, "seconds": seconds}


def _fit_one_head(x, centres, precision, rho, xv, v_centres, v_rho, cfg) -> list[torch.Tensor]:
    """One head as the released code trains it: ``x: [n, D]`` with its targets; returns the best-epoch (W, R, B, s)."""
    from florain.projection import hinge_loss

    d, k = x.shape[1], cfg.rank
    bound = 1 / math.sqrt(k)
    params = [torch.empty(d, k).uniform_(-bound, bound), torch.empty(d, k).uniform_(-bound, bound),
              torch.zeros(d, k), torch.zeros(d)]
    W, R, B, c = (p.requires_grad_() for p in params)
    opt = torch.optim.Adam(params, lr=cfg.lr)

    def f(a: torch.Tensor) -> torch.Tensor:
        mat = torch.tanh(W * a.unsqueeze(-1) + B) @ R.T  # [n, D, D]
        return a + (mat @ a.unsqueeze(-1)).squeeze(-1) + c

    best, best_params = math.inf, params
    for _ in range(cfg.epochs):
        for idx in torch.randperm(len(x)).split(cfg.batch_size):
            loss = hinge_loss(f(x[idx]), centres[idx], precision, rho[idx]).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            val = float(hinge_loss(f(xv), v_centres, precision, v_rho).mean())
        if val < best:
            best, best_params = val, [p.detach().clone() for p in params]
    return best_params


def _bandwidth_gb_s() -> float:
    """This machine's memory read bandwidth: the best of 3 sums over a 1 GiB tensor (far beyond any cache)."""
    x = torch.ones(2**28)
    best = math.inf
    for _ in range(3):
        t = time.perf_counter()
        float(x.sum())
        best = min(best, time.perf_counter() - t)
    return x.numel() * 4 / best / 1e9


def _matmul_gflop_s(n: int = 2048) -> float:
    """This machine's fp32 matrix-multiply rate at torch's thread count: the best of 5 ``[n, n] @ [n, n]``
    products (large enough that the kernel, not the call, sets the time)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    best = math.inf
    for _ in range(5):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


#: Batches the decoding benchmark measures (128: the default ``--gen-batch-size``); HF ``generate`` (the earlier
#: path, whose every row holds the whole prompt) up to :data:`GENERATE_MAX_BATCH` only (a round at 128: minutes).
DECODE_BATCHES = (1, 16, 32, 64, 128)
GENERATE_MAX_BATCH = 64


def part_decode(model: str, data_dir: str | None, limit: int | None, new_tokens: int, rounds: int) -> dict:
    """Greedy decoding throughput, HF ``generate`` on left-padded batches (the earlier path) vs
    :func:`bench.decoding.decode` (shared prefix once, in-place KV cache), both with a FLORAIN hook and every row
    running all ``new_tokens`` steps, prefill included; alternating rounds, median reported. A step can go no
    faster than either bound: reading the weights once plus each row's KV cache at this machine's measured read
    bandwidth, or its multiply-adds (every row through the weights, and its attention over its context) at this
    machine's measured matrix-multiply rate."""
    from bench.decoding import common_length, decode, shared_prefix
    from bench.generation import gen_prompt
    from bench.interventions import Intervention
    from bench.models import load_model
    from florain import LowRankHeadMap

    lm = load_model(model, device="cpu")
    heads, dim = lm.spec.site_shape("heads")
    layer = bench_layer(lm)
    iv = Intervention("florain", "heads", {layer: LowRankHeadMap(heads, dim, 32, torch.Generator().manual_seed(0))},
                      {"heads": heads, "head_dim": dim})
    prompts = [gen_prompt(q.question) for q in _questions(data_dir, max(DECODE_BATCHES))]
    ids = lm.tokenizer(prompts)["input_ids"]
    tok = lm.tokenizer
    weight_bytes = sum(p.numel() * p.element_size() for p in lm.model.parameters())
    cfg = lm.model.config
    kv_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * lm.spec.head_dim * 4
    bandwidth, gflop_s = _bandwidth_gb_s(), _matmul_gflop_s()
    weights, shared = _weights(lm), common_length(ids)  # the shared prefix's keys: read once per step
    out = {}
    for batch in DECODE_BATCHES:
        enc = tok(prompts[:batch], return_tensors="pt", padding=True, padding_side="left")
        rates: dict[str, list[float]] = {"generate": [], "decode": []} if batch <= GENERATE_MAX_BATCH else {"decode": []}
        for r in range(rounds + 1):  # round 0: warm-up, not recorded
            for label in rates:
                t = time.perf_counter()
                with torch.no_grad():
                    if label == "generate":
                        with iv.applied(lm, positions="last"):
                            lm.model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                              do_sample=False, pad_token_id=tok.pad_token_id)
                    else:
                        decode(lm, ids[:batch], shared_prefix(lm, ids, iv), new_tokens, intervention=iv,
                               batch_size=batch)
                if r:
                    rates[label].append(batch * new_tokens / (time.perf_counter() - t))
        context = statistics.mean(len(x) for x in ids[:batch]) + new_tokens / 2
        memory = batch * bandwidth * 1e9 / (weight_bytes + (shared + batch * (context - shared)) * kv_per_token)
        compute = gflop_s * 1e9 / _flops({"tokens": 1, "logit_rows": 1, "attention_pairs": context}, weights)
        med = {k: statistics.median(v) for k, v in rates.items()}
        bound = min(memory, compute)
        out[f"batch_{batch}"] = {"generate_tok_s": med.get("generate"), "decode_tok_s": med["decode"],
                                 "bandwidth_bound_tok_s": memory, "compute_bound_tok_s": compute,
                                 "bound_tok_s": bound, "fraction_of_bound": med["decode"] / bound, "rounds": rates}
    return {"new_tokens": new_tokens, "layer": layer, "rounds": rounds, "shared_prefix_tokens": shared,
            "bandwidth_gb_s": bandwidth,
            "matmul_gflop_s": gflop_s, "threads": torch.get_num_threads(), "weight_mb": weight_bytes / 1e6, **out}


#: The generation batch of the earlier code path (the default before the continuous-batching decoder).
LEGACY_GEN_BATCH = 16
#: The scorer's answers per pass on the earlier code path (``eval_batch_size`` before ``score_batch_size``).
LEGACY_SCORE_BATCH = 16


def carry_fits(src: Path, dst: Path) -> bool:
    """Copy a run folder's identity marker and every fold's fit (:meth:`RunFolder.fitted`) from ``src`` into the
    empty run folder ``dst``, so that a run resumed there evaluates the same fitted interventions without fitting
    again; False when ``src`` holds no run."""
    source, target = RunFolder(src), RunFolder(dst)
    if not source.config.is_file():
        return False
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy2(source.config, target.config)
    for k in range(json.loads(source.config.read_text())["config"]["folds"]):
        for path, copy in zip(source.fitted(k), target.fitted(k)):
            if path.is_dir():
                shutil.copytree(path, copy)
            elif path.is_file():
                shutil.copy2(path, copy)
    return True


def part_protocol(model: str, data_dir: str | None, limit: int | None, method: str, legacy: bool,
                  fits: str | None = None, kl_windows: int | None = None) -> dict:
    """The full ``--task truthfulqa`` protocol of one method (fit included, timed apart) with the earlier code
    paths (``legacy``: HF ``generate`` on batches of :data:`LEGACY_GEN_BATCH` and the scorer at
    :data:`LEGACY_SCORE_BATCH` answers per pass, as the earlier code ran them) or the
    current ones (the default settings); returns per-part seconds per fold, the metrics, every answer, each part's
    model work (:func:`counted_parts`) and this machine's matrix-multiply rate measured just before the run.

    ``fits``: a folder shared by both paths' measurements. The first to run fits each fold and leaves its fits
    there; the second evaluates those same interventions (``fit_reused``), so a method is fitted once and both
    paths' answers come from one fitted edit. ``kl_windows``: KL/CE windows per fold (None: the run's default,
    100, whatever ``limit`` says; fewer shorten a run on a larger model)."""
    from bench.runner import RunConfig, run

    with tempfile.TemporaryDirectory() as tmp:
        cfg = RunConfig(method=method, model=model, task="truthfulqa", limit=limit, legacy_paths=legacy)
        if kl_windows is not None:
            cfg = replace(cfg, kl_windows=kl_windows)
        if legacy:
            cfg = replace(cfg, gen_batch_size=LEGACY_GEN_BATCH, score_batch_size=LEGACY_SCORE_BATCH)
        folder = RunFolder(Path(tmp) / "run")
        reused = fits is not None and carry_fits(Path(fits), folder.path)
        gflop_s, work = _matmul_gflop_s(), {}
        t = time.perf_counter()
        with counted_parts(work):
            run(cfg, folder.path, data_dir=data_dir, resume=reused,
                echo=lambda msg: print(msg, file=sys.stderr, flush=True))
        seconds = time.perf_counter() - t
        if fits is not None and not reused:
            carry_fits(folder.path, Path(fits))
        res, recs = folder.read_results(), folder.read_per_question()
    return {"method": method, "legacy": legacy, "limit": limit, "kl_windows": cfg.kl_windows, "seconds": seconds,
            "work": work, "matmul_gflop_s": gflop_s,
            "gen_batch_size": cfg.gen_batch_size, "score_batch_size": cfg.score_batch_size,
            "fit_reused": reused, "folds": [f["timings"] for f in res["folds"]], "metrics": res["metrics"],
            "answers": {str(r["index"]): r.get("answer") for r in recs},
            "mc2": {str(r["index"]): r.get("mc2") for r in recs}}


PARTS = {"mc_ours": part_mc_ours, "mc_lmeval": part_mc_lmeval, "gen": part_gen,
         "fit_batched": part_fit_batched, "fit_loop": part_fit_loop, "decode": part_decode,
         "protocol": part_protocol}


def run_part(name: str, **kwargs) -> dict:
    """Run one part in a fresh subprocess; adds its peak RSS in MB."""
    code = (
        "import json, resource, sys\n"
        "from bench.perf import PARTS\n"
        f"res = PARTS[{name!r}](**json.loads(sys.argv[1]))\n"
        "res['peak_rss_mb'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024\n"
        "print('@@RESULT@@' + json.dumps(res))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(kwargs)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"perf part {name} failed:\n{proc.stderr[-3000:]}")
    line = [x for x in proc.stdout.splitlines() if x.startswith("@@RESULT@@")][-1]
    return json.loads(line[len("@@RESULT@@"):])


def compare_mc(ours: dict, theirs: dict) -> dict:
    """Means, the speed-up and the largest per-question difference of MC1 and MC2."""
    mean = {m: sum(ours["per_question"][m]) / len(ours["per_question"][m]) for m in ("mc1", "mc2")}
    their_mean = {m: sum(theirs["per_question"][m]) / len(theirs["per_question"][m]) for m in ("mc1", "mc2")}
    per_q = max(abs(a - b) for m in ("mc1", "mc2") for a, b in zip(ours["per_question"][m], theirs["per_question"][m]))
    return {"ours": mean, "lm_eval": their_mean, "speedup": theirs["seconds"] / ours["seconds"],
            "max_abs_diff_mean": max(abs(mean[m] - their_mean[m]) for m in mean), "max_abs_diff_question": per_q}


def _stamp(part: dict) -> str:
    git = part.get("git") or {}
    commit = str(git.get("commit"))[:10] + (" + uncommitted changes" if git.get("dirty") else "")
    return f"(`{part['command'].strip()}`, git {commit}, finished {part['finished'][:16]})"


def to_markdown(parts: dict, env: dict) -> str:
    """``perf.md`` from the measured parts (keys as in :data:`STEPS`)."""
    lines = ["# Performance benchmarks", "", f"Machine: {env['platform']}, {env['cpu_count']} CPU cores, "
             f"torch {env['packages']['torch']}, transformers {env['packages']['transformers']}. Written by "
             "`make bench-perf` (`python -m bench.perf`). Each implementation ran in its own process, alone on the "
             "machine; peak RSS is that process's maximum resident memory, model included. Each part names the "
             "command and commit that measured it.", ""]
    if "mc_ours" in parts and "mc_lmeval" in parts:
        o, t = parts["mc_ours"], parts["mc_lmeval"]
        c = compare_mc(o, t)
        lines += ["## TruthfulQA MC1 + MC2 (lm-eval prompt), ours vs lm-eval", "",
                  f"{o['questions']} questions, {o['answers']} distinct answers; ours {o['batch_size']} answers per "
                  f"forward pass, lm-eval {t['batch_size']} texts per forward pass (each at its own best measured "
                  "setting: see results/README.md); model loading excluded from both times.", "",
                  "| | wall time (s) | MC1 | MC2 | peak RSS (MB) |", "|---|---|---|---|---|",
                  f"| ours (shared prefix, question + answer trie per row) | {o['seconds']:.1f} | {c['ours']['mc1']:.6f} | {c['ours']['mc2']:.6f} | {o['peak_rss_mb']:.0f} |",
                  f"| lm-eval {t.get('lm_eval_version') or ''} | {t['seconds']:.1f} | {c['lm_eval']['mc1']:.6f} | {c['lm_eval']['mc2']:.6f} | {t['peak_rss_mb']:.0f} |",
                  "", f"Speed-up **{c['speedup']:.1f}×** (target ≥ 15×, issue 20). Largest difference of a mean: "
                  f"{c['max_abs_diff_mean']:.1e}; of any single question's MC1 or MC2: {c['max_abs_diff_question']:.1e} "
                  "(target ≤ 1e-4).", "", f"Ours {_stamp(o)}; lm-eval {_stamp(t)}.", ""]
        lines += _work_lines(o, t)
    if "gen" in parts:
        g = parts["gen"]
        lines += [f"## Greedy generation, {g['new_tokens']} new tokens, FLORAIN hook at layer {g['layer']}", "",
                  f"Median of {g['rounds']} alternating rounds per setting after a warm-up (peak RSS "
                  f"{g['peak_rss_mb']:.0f} MB) {_stamp(g)}.", "",
                  "| batch | plain (tok/s) | with FLORAIN (tok/s) | slowdown (target ≤ 3 %) |", "|---|---|---|---|"]
        for b in (1, 16):
            row = g[f"batch_{b}"]
            lines.append(f"| {b} | {row['plain_tok_s']:.1f} | {row['florain_tok_s']:.1f} | {row['slowdown_pct']:+.1f} % |")
        lines.append("")
    if any(k.startswith("protocol_") for k in parts):
        lines += _protocol_lines(parts)
    if "decode" in parts:
        lines += _decode_lines(parts["decode"])
    if "fit_loop" in parts and "fit_batched" in parts:
        lp, b, cb = parts["fit_loop"], parts["fit_batched"], parts.get("fit_batched_compiled")
        lines += [f"## FLORAIN fit, all {b['heads']} heads of layer {b['layer']} (head dim {b['head_dim']}, rank "
                  f"{b['rank']}), both folds, {b['epochs']} epochs", "",
                  f"{b['train_samples']} training samples over the two folds; batch 100, Adam, a validation pass "
                  f"per epoch in both {_stamp(b)}.", "",
                  "| implementation | wall time (s) | per epoch and fold (s) | speed-up vs loop | peak RSS (MB) |",
                  "|---|---|---|---|---|"]
        rows = [("per-head loop, D×D matrix per sample (released code's shape)", lp),
                ("batched heads, eager (library default)", b)]
        if cb:
            rows.append(("batched heads, torch.compile (compile time included)", cb))
        for name, r in rows:
            lines.append(f"| {name} | {r['seconds']:.1f} | {r['seconds'] / (2 * r['epochs']):.3f} | "
                         f"{lp['seconds'] / r['seconds']:.1f}× | {r['peak_rss_mb']:.0f} |")
        lines.append("")
    return "\n".join(lines)


PROTOCOL_METHODS = ("none", "caa", "florain", "iti")
STEPS = {  # command-line part -> the measured sub-parts it (re)runs
    "mc": ("mc_ours", "mc_lmeval"), "mc-ours": ("mc_ours",), "mc-lmeval": ("mc_lmeval",), "gen": ("gen",),
    "fit": ("fit_loop", "fit_batched", "fit_batched_compiled"), "decode": ("decode",),
    "protocol": tuple(f"protocol_{m}{s}" for m in PROTOCOL_METHODS for s in ("", "_legacy")),  # current first: it fits
}


def _work_lines(ours: dict, theirs: dict) -> list[str]:
    """What each MC scorer computes, and the speed-up that work allows at an equal FLOP rate."""
    o, t = ours.get("work"), ours.get("lm_eval_work")
    if not o or not t:
        return []
    rows = [("forward passes", "forward_passes", "{:,}"), ("token positions fed (padding included)", "tokens", "{:,}"),
            ("logit rows (× vocabulary)", "logit_rows", "{:,}"), ("attention pairs (query × key slot)",
                                                                   "attention_pairs", "{:,}"),
            ("TFLOP", "flops", None)]
    lines = ["Work (ours counted by hooks during the timed run; lm-eval's from its requests: each pair run whole but "
             "its last token, batches sorted longest first and padded, logits at every position):", "",
             "| | ours | lm-eval | ratio |", "|---|---|---|---|"]
    for name, key, fmt in rows:
        a, b = (o[key] / 1e12, t[key] / 1e12) if fmt is None else (o[key], t[key])
        cell = (lambda v: f"{v:.1f}") if fmt is None else fmt.format
        lines.append(f"| {name} | {cell(a)} | {cell(b)} | {b / a:.1f}× |")
    rate_o, rate_t = o["flops"] / ours["seconds"] / 1e9, t["flops"] / theirs["seconds"] / 1e9
    lines += ["", f"At an equal FLOP rate the speed-up could not exceed **{t['flops'] / o['flops']:.1f}×**: that "
              f"is the bound on this arithmetic (the answers' tokens must be run; only their shared context can be "
              f"cached). Achieved rates: ours {rate_o:.0f} GFLOP/s, lm-eval {rate_t:.0f} GFLOP/s"
              + (" (lm-eval's long, uniform rows keep the matrix units busier than our short answer rows)."
                 if rate_t > rate_o else "."), ""]
    return lines


def _protocol_lines(parts: dict) -> list[str]:
    """The protocol section: per method, each part's seconds (both folds) with the earlier and current code paths,
    the ratio, the share of identical answers and the largest metric difference."""
    lines = ["## Full TruthfulQA protocol, earlier vs current code paths", "",
             "`--task truthfulqa` (MC1/2/3, generation + judge, answer fluency, KL/CE; windows per method), 2-fold CV, "
             "both folds; the fit is timed apart and excluded from the ratio. Earlier path: HF `generate` on "
             "left-padded batches, the output embedding fed strided slices, the scorer context by context and "
             "KL/CE over whole batches (`RunConfig.legacy_paths`, `bench/earlier.py`); current: the shared prefix "
             "computed once, continuous batching, an in-place KV cache, each question and its answers' trie one "
             "scoring row, KL/CE in chunks of positions, its intervened pass starting at the first edited layer "
             "(from 2026-12-04). Each path's "
             "generation batch and the scorer's answers per pass are listed per method (measurements before 2026-12-03 "
             "ran both paths' generation at 32; before 2026-12-04 both scored 16 answers per pass).", ""]
    for m in PROTOCOL_METHODS:
        old, new = parts.get(f"protocol_{m}_legacy"), parts.get(f"protocol_{m}")
        if not old or not new:
            continue
        batches = "; generation batch: earlier {}, current {}".format(*(r.get("gen_batch_size", 32) for r in (old, new)))
        batches += "; answers per scoring pass: earlier {}, current {}".format(
            *(r.get("score_batch_size", 16) for r in (old, new)))
        windows = f"; KL/CE windows: {new.get('kl_windows') or 100}"
        lines += [f"### {m} (limit: {new['limit'] or 'all 817 questions'}{batches}{windows})", ""]
        lines += _protocol_table(old, new)
        lines.append(_fit_row(old, new))
        same = sum(old["answers"][k] == new["answers"].get(k) for k in old["answers"])
        diffs = {k: abs(old["metrics"][k]["mean"] - new["metrics"][k]["mean"])
                 for k in ("true", "info", "true_info_product", "mc1", "mc2", "ce", "kl", "answer_nll")
                 if k in old["metrics"] and k in new["metrics"]}
        lines += ["", f"Identical answers: {same} of {len(old['answers'])}. Largest metric difference: "
                  + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()) + f". Earlier {_stamp(old)}; current "
                  f"{_stamp(new)}.", ""]
        lines += _protocol_bound(old, new)
    return lines


#: The protocol's evaluated parts, in the order a fold runs them.
PROTOCOL_PARTS = ("mc", "gen", "fluency", "klce")


def _seconds(r: dict, key: str, judge_apart: bool = False) -> float:
    """A timing summed over a measurement's folds (``gen`` with ``judge_apart``: decoding alone, the judge's
    share taken out; both measurements of a comparison must have it)."""
    total = lambda k: sum(f.get(k, 0.0) for f in r["folds"])  # noqa: E731
    return total("gen_s") - total("judge_s") if key == "gen" and judge_apart else total(f"{key}_s")


def _judged(r: dict) -> bool:
    return all("judge_s" in f for f in r["folds"])


def _protocol_table(old: dict, new: dict) -> list[str]:
    """Per part: seconds with both paths and their ratio; with work counts, each path's TFLOP, the current path's
    achieved rate and its time at the measured matrix-multiply rate. ``gen`` is decoding; ``judge`` its verdicts."""
    work = bool(old.get("work") and new.get("work"))
    head = "| part | earlier (s) | current (s) | speed-up |"
    if work:
        head += " TFLOP (earlier / current) | current GFLOP/s | current at the matmul rate (s) |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    apart = _judged(old) and _judged(new)  # the judge's seconds known on both sides: shown apart from decoding
    names = [*PROTOCOL_PARTS[:2], *(["judge"] if apart else []), *PROTOCOL_PARTS[2:], "eval"]
    for name in names:
        a, b = _seconds(old, name, apart), _seconds(new, name, apart)
        cells = [name, f"{a:.1f}", f"{b:.1f}", f"{a / b:.2f}×" if b > 0 else ""]
        parts = PROTOCOL_PARTS if name == "eval" else (name,) if name in PROTOCOL_PARTS else ()
        if work and parts:
            fa, fb = _tflop(old, parts), _tflop(new, parts)
            model_s = b - (_seconds(new, "judge") if name == "eval" and _judged(new) else 0.0)
            rate = f"{1e3 * fb / model_s:.0f}" if model_s > 0 else ""
            cells += [f"{fa:.1f} / {fb:.1f}", rate, f"{1e3 * fb / new['matmul_gflop_s']:.1f}"]
        elif work:
            cells += ["", "", ""]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _tflop(r: dict, parts: tuple[str, ...]) -> float:
    return sum(r["work"].get(p, {}).get("flops", 0.0) for p in parts) / 1e12


def _protocol_bound(old: dict, new: dict) -> list[str]:
    """The speed-up the current path's arithmetic allows at this machine's matrix-multiply rate."""
    if not (old.get("work") and new.get("work")):
        return []
    rate, judge = new["matmul_gflop_s"], _seconds(new, "judge") if _judged(new) else 0.0
    tflop = _tflop(new, PROTOCOL_PARTS)
    arithmetic, earlier = 1e3 * tflop / rate, _seconds(old, "eval")
    return [f"Bound: at the fp32 matrix-multiply rate measured in the same process ({rate:.0f} GFLOP/s, best of 5 "
            f"2048² products), the current path's arithmetic ({tflop:.1f} TFLOP through the "
            f"run's model: tokens through its weights, logit rows, attention pairs, masked slots included; the "
            f"earlier path's: {_tflop(old, PROTOCOL_PARTS):.1f}) takes about {arithmetic:.0f} s"
            + (f", and the judge took {judge:.0f} s" if judge else "") + f". Running this arithmetic faster could "
            f"make the earlier path's {earlier:.0f} s about **{earlier / (arithmetic + judge):.2f}×** faster at "
            "most; a larger speed-up needs less arithmetic.", ""]


def _fit_row(old: dict, new: dict) -> str:
    """The fit's row: both folds' fit seconds; a fit done once and reused by the other path is shown once."""
    a, b = (sum(f.get("fit_s", 0.0) for f in r["folds"]) for r in (old, new))
    if old.get("fit_reused") or new.get("fit_reused"):
        who = "current" if old.get("fit_reused") else "earlier"
        return f"| fit (once, by the {who} path; the other evaluated the same fitted edit) | {a:.1f} | {b:.1f} | |"
    return f"| fit | {a:.1f} | {b:.1f} | |"


def _decode_lines(d: dict) -> list[str]:
    """The decoding section; a measurement from before the compute bound existed shows the bandwidth bound only."""
    roofline = "matmul_gflop_s" in d
    kv = "the shared prefix's KV cache once and each row's own" if "shared_prefix_tokens" in d else "each row's KV cache"
    bounds = (f"Bounds per step: one read of the weights ({d['weight_mb']:.0f} MB) plus {kv} at this "
              f"machine's measured read bandwidth ({d['bandwidth_gb_s']:.1f} GB/s, best of 3 sums over 1 GiB)")
    if roofline:
        bounds += (f", and each row's multiply-adds (the weights, and attention over its context) at this machine's "
                   f"measured fp32 matrix-multiply rate ({d['matmul_gflop_s']:.0f} GFLOP/s on {d['threads']} threads, "
                   f"best of 5 2048² products); the lower of the two is the bound")
    lines = [f"## Greedy decoding throughput, {d['new_tokens']} new tokens, FLORAIN hook at layer {d['layer']}", "",
             f"Every row runs all steps, prefill included; median of {d['rounds']} alternating rounds after a "
             f"warm-up. {bounds} {_stamp(d)}.", ""]
    if roofline:
        lines += ["| batch | HF generate (tok/s) | ours (tok/s) | speed-up | bandwidth bound (tok/s) | "
                  "compute bound (tok/s) | ours / bound |", "|---|---|---|---|---|---|---|"]
    else:
        lines += ["| batch | HF generate (tok/s) | ours (tok/s) | speed-up | bandwidth bound (tok/s) | ours / bound |",
                  "|---|---|---|---|---|---|"]
    for key, row in ((k, v) for k, v in d.items() if k.startswith("batch_")):
        plain = row.get("generate_tok_s")
        cells = [key[6:], f"{plain:.1f}" if plain else "not run", f"{row['decode_tok_s']:.1f}",
                 f"{row['decode_tok_s'] / plain:.2f}×" if plain else "",
                 f"{row.get('bandwidth_bound_tok_s', row['bound_tok_s']):.0f}"]
        if roofline:
            cells.append(f"{row['compute_bound_tok_s']:.0f}")
        lines.append("| " + " | ".join(cells + [f"{100 * row['fraction_of_bound']:.0f} %"]) + " |")
    return lines + [""]


def _arguments(argv: list[str] | None):
    """The command line, checked: ``(args, parts, protocol methods)``; an unknown part or method is an error that
    lists the valid ones."""
    import argparse

    from bench.runner import RunConfig

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--limit", type=int, default=None, help="questions for the MC and fit parts (default: all 817)")
    p.add_argument("--parts", default="mc,gen,fit", help=f"comma-separated: {', '.join(STEPS)}")
    p.add_argument("--fit-epochs", type=int, default=50)
    p.add_argument("--gen-rounds", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=16, help="lm-eval's texts per forward pass (MC part)")
    p.add_argument("--score-batch-size", type=int, default=RunConfig.score_batch_size,
                   help="our scorer's answers per forward pass (MC part; default: the run's)")
    p.add_argument("--protocol-methods", default=",".join(PROTOCOL_METHODS),
                   help="methods the protocol part runs (each with both code paths)")
    p.add_argument("--kl-windows", type=int, default=None,
                   help="protocol part: KL/CE windows per fold (default: the run's 100, whatever --limit says)")
    p.add_argument("--output", default="results")
    a = p.parse_args(argv)
    if a.kl_windows is not None and a.kl_windows < 1:
        p.error(f"--kl-windows must be ≥ 1, got {a.kl_windows}")
    parts = [x.strip() for x in a.parts.split(",") if x.strip()]
    unknown = sorted(set(parts) - set(STEPS))
    if unknown:
        p.error(f"unknown part(s) {unknown}; valid: {', '.join(STEPS)}")
    methods = {m.strip() for m in a.protocol_methods.split(",") if m.strip()}
    if methods - set(PROTOCOL_METHODS):
        p.error(f"unknown protocol method(s) {sorted(methods - set(PROTOCOL_METHODS))}; valid: {PROTOCOL_METHODS}")
    return a, parts, methods


def _step_arguments(a, fits: Path) -> dict[str, dict]:
    """Each step's keyword arguments; the protocol steps of a method share its fits folder (see part_protocol)."""
    kwargs = {"mc_ours": {"batch_size": a.score_batch_size, "lm_eval_batch_size": a.batch_size},
              "mc_lmeval": {"batch_size": a.batch_size},
              "gen": {"new_tokens": 50, "rounds": a.gen_rounds}, "fit_loop": {"epochs": a.fit_epochs},
              "fit_batched": {"epochs": a.fit_epochs, "compile": False},
              "fit_batched_compiled": {"epochs": a.fit_epochs, "compile": True},
              "decode": {"new_tokens": 50, "rounds": a.gen_rounds}}
    for m in PROTOCOL_METHODS:
        for suffix, legacy in (("_legacy", True), ("", False)):
            kwargs[f"protocol_{m}{suffix}"] = {"method": m, "legacy": legacy, "fits": str(fits / m),
                                               "kl_windows": a.kl_windows}
    return kwargs


def main(argv: list[str] | None = None) -> None:
    """Run the requested parts and merge them into ``OUTPUT/perf.json``: parts not rerun keep their earlier
    measurement (each part records its own git commit, command and time), so one expensive part can be
    re-measured alone. ``perf.md`` is rewritten from the merged file."""
    from bench.runs import environment, now_iso, write_json

    a, parts, methods = _arguments(argv)
    out = Path(a.output)
    path = out / "perf.json"
    previous = json.loads(path.read_text()) if path.exists() else {}
    env = environment("cpu")
    command = "python -m bench.perf " + " ".join(argv if argv is not None else sys.argv[1:])
    common = {"model": a.model, "data_dir": a.data_dir, "limit": a.limit}
    fits = Path(tempfile.mkdtemp())  # each method's fits, shared by its two paths (see part_protocol)
    kwargs = _step_arguments(a, fits)
    function = {name: "fit_batched" if name == "fit_batched_compiled" else "protocol" if
                name.startswith("protocol_") else name for name in kwargs}
    measured = dict(previous.get("parts", {}))
    if previous.get("parts") and any(v.get("model") != a.model for v in previous["parts"].values()):
        measured = {}  # another model's measurements are not comparable: start afresh
    steps = [s for part in parts for s in STEPS[part]
             if not s.startswith("protocol_") or kwargs[s]["method"] in methods]
    try:
        for name in dict.fromkeys(steps):
            print(f"running {name} ...", flush=True)
            res = run_part(function[name], **common, **kwargs[name])
            print(json.dumps({k: v for k, v in res.items() if k not in ("per_question", "answers", "mc2")}), flush=True)
            measured[name] = {**res, "model": a.model, "limit": a.limit, "command": command, "finished": now_iso(),
                              "git": env["git"]}
            out.mkdir(parents=True, exist_ok=True)
            write_json(path, {"parts": measured, "environment": env})  # after every part: a later failure loses none
            (out / "perf.md").write_text(to_markdown(measured, env))
    finally:
        shutil.rmtree(fits, ignore_errors=True)
    print((out / "perf.md").read_text())


if __name__ == "__main__":
    main()
