"""Performance benchmarks (``make bench-perf``): each part measured side by side in one process, in its own
subprocess so that peak memory (max RSS) is per part. Results go to ``results/perf.md`` and ``results/perf.json``."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def _questions(data_dir: str | None, limit: int | None):
    from bench.data.truthfulqa import load_truthfulqa

    qs, _ = load_truthfulqa(data_dir)
    return qs[:limit] if limit else qs


def part_mc(model: str, data_dir: str | None, limit: int | None, batch_size: int) -> dict:
    """TruthfulQA MC1+MC2: our shared-prefix scorer (lm-eval prompt mode) vs lm-eval's own tasks."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from bench.lm_eval_plugin import InterventionLM, write_truthfulqa_tasks
    from bench.models import load_model
    from bench.tasks.truthfulqa_mc import evaluate_mc

    qs = _questions(data_dir, limit)
    lm = load_model(model, device="cpu")
    t = time.perf_counter()
    recs = evaluate_mc(lm, qs, None, mode="lm-eval", batch_size=batch_size)
    ours_s = time.perf_counter() - t
    ours = {m: sum(r[m] for r in recs) / len(recs) for m in ("mc1", "mc2")}
    with tempfile.TemporaryDirectory() as tmp:
        names = write_truthfulqa_tasks(qs, tmp)
        t = time.perf_counter()
        out = lm_eval.simple_evaluate(model=InterventionLM(pretrained=lm, batch_size=batch_size), tasks=names,
                                      task_manager=TaskManager(include_path=tmp))
        theirs_s = time.perf_counter() - t
    theirs = {n.rsplit("_", 1)[1]: out["results"][n]["acc,none"] for n in names}
    return {"questions": len(qs), "batch_size": batch_size, "ours_s": ours_s, "lm_eval_s": theirs_s,
            "speedup": theirs_s / ours_s, "ours": ours, "lm_eval": theirs,
            "max_abs_diff": max(abs(ours[m] - theirs[m]) for m in ours)}


def part_gen(model: str, data_dir: str | None, limit: int | None, new_tokens: int) -> dict:
    """Greedy generation tokens/s with and without a FLORAIN hook (policy: last prompt token + generated tokens)."""
    from bench.interventions import Intervention
    from bench.models import load_model
    from bench.prompts import INSTRUCTION, QA_PRIMER
    from florain import LowRankHeadMap

    lm = load_model(model, device="cpu")
    heads, dim = lm.spec.site_shape("heads")
    layer = lm.default_layer if lm.default_layer is not None else lm.spec.n_layers // 2
    iv = Intervention("florain", "heads", {layer: LowRankHeadMap(heads, dim, 32, torch.Generator().manual_seed(0))},
                      {"heads": heads, "head_dim": dim})
    qs = _questions(data_dir, 32)
    prompts = [f"{INSTRUCTION}\n\n{QA_PRIMER}\n\nQ: {q.question}\nA:" for q in qs]
    tok = lm.tokenizer
    out = {}
    for batch in (1, 16):
        rows = {}
        for label, active in (("plain", False), ("florain", True)):
            times, tokens = [], 0
            for rep in range(3 if batch == 1 else 1):
                chunk = prompts[rep * batch:(rep + 1) * batch] if batch == 1 else prompts[:batch]
                enc = tok(chunk, return_tensors="pt", padding=True, padding_side="left")
                ctx = iv.applied(lm, positions="last") if active else torch.no_grad()
                with torch.no_grad(), ctx:
                    t = time.perf_counter()
                    gen = lm.model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                            do_sample=False, pad_token_id=tok.pad_token_id)
                    times.append(time.perf_counter() - t)
                tokens += (gen.shape[1] - enc["input_ids"].shape[1]) * gen.shape[0]
            rows[label] = tokens / sum(times)
        out[f"batch_{batch}"] = {"plain_tok_s": rows["plain"], "florain_tok_s": rows["florain"],
                                 "slowdown_pct": 100 * (rows["plain"] / rows["florain"] - 1)}
    return {"new_tokens": new_tokens, "layer": layer, **out}


def part_fit(model: str, data_dir: str | None, limit: int | None, epochs: int) -> dict:
    """FLORAIN fit for all heads of one layer (both folds): batched heads vs a per-head loop that forms the
    D×D matrix L(a)Rᵀ per sample, as the released code does. Same data, epochs and batch size."""
    from bench.data.truthfulqa import make_folds
    from bench.methods import FitContext
    from bench.models import load_model
    from florain import FlorainConfig, fit_florain
    from florain.region import build_regions
    from florain.train import training_pairs

    lm = load_model(model, device="cpu")
    qs = _questions(data_dir, limit)
    layer = lm.default_layer
    cfg = FlorainConfig(epochs=epochs, compile=True)
    batched_s, loop_s = 0.0, 0.0
    for fold in make_folds(len(qs)):
        ctx = FitContext(lm, qs, fold, layer, "heads")
        acts_by, labels, groups = ctx.activations()
        acts = acts_by[layer]
        tr, va = ctx.split(groups, "train"), ctx.split(groups, "val")
        t = time.perf_counter()
        fit_florain(acts[tr], labels[tr], groups[tr], acts[va], labels[va], groups[va], cfg)
        batched_s += time.perf_counter() - t
        t = time.perf_counter()
        _per_head_reference_loop(acts[tr], labels[tr], groups[tr], cfg, build_regions, training_pairs)
        loop_s += time.perf_counter() - t
    return {"epochs": epochs, "layer": layer, "batched_s": batched_s, "per_head_loop_s": loop_s,
            "speedup": loop_s / batched_s, "note": "per-head loop without validation passes (favours the loop)"}


def _per_head_reference_loop(acts, labels, groups, cfg, build_regions, training_pairs) -> None:
    """The released code's structure: one head at a time, an explicit D×D matrix per sample."""
    from florain.projection import hinge_loss

    torch.manual_seed(cfg.seed)
    for h in range(acts.shape[1]):
        a_h = acts[:, h : h + 1]
        lam = cfg.lam_scale * float(acts.norm(dim=-1).mean())
        regions = build_regions(a_h, labels, groups, alpha=cfg.alpha, lam=lam)
        rows, owner = training_pairs(groups, regions)
        x = a_h[rows, 0]
        d, k = x.shape[1], cfg.rank
        bound = 1 / math.sqrt(k)
        W = torch.empty(d, k).uniform_(-bound, bound).requires_grad_()
        R = torch.empty(d, k).uniform_(-bound, bound).requires_grad_()
        B = torch.zeros(d, k, requires_grad=True)
        c = torch.zeros(d, requires_grad=True)
        opt = torch.optim.Adam([W, R, B, c], lr=cfg.lr)
        for _ in range(cfg.epochs):
            for idx in torch.randperm(len(x)).split(cfg.batch_size):
                a = x[idx]
                mat = torch.tanh(W * a.unsqueeze(-1) + B) @ R.T  # [n, D, D]
                out = a + (mat @ a.unsqueeze(-1)).squeeze(-1) + c
                loss = hinge_loss(out, regions.centres[owner[idx], 0], regions.precision[0], regions.rho[owner[idx], 0]).sum()
                opt.zero_grad()
                loss.backward()
                opt.step()


PARTS = {"mc": part_mc, "gen": part_gen, "fit": part_fit}


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


def to_markdown(res: dict, env: dict) -> str:
    lines = ["# Performance benchmarks", "", f"Machine: {env['platform']}, {env['cpu_count']} CPU cores, "
             f"torch {env['packages']['torch']}, transformers {env['packages']['transformers']}, "
             f"git {str(env['git']['commit'])[:10]}. Command: `{res['command']}`.", ""]
    if "mc" in res:
        m = res["mc"]
        lines += ["## TruthfulQA MC1 + MC2 (lm-eval prompt), ours vs lm-eval", "",
                  "| questions | ours (s) | lm-eval (s) | speed-up | MC1 ours / lm-eval | MC2 ours / lm-eval | max abs diff | peak RSS (MB) |",
                  "|---|---|---|---|---|---|---|---|",
                  f"| {m['questions']} | {m['ours_s']:.1f} | {m['lm_eval_s']:.1f} | {m['speedup']:.1f}× | "
                  f"{m['ours']['mc1']:.4f} / {m['lm_eval']['mc1']:.4f} | {m['ours']['mc2']:.4f} / {m['lm_eval']['mc2']:.4f} | "
                  f"{m['max_abs_diff']:.2e} | {m['peak_rss_mb']:.0f} |", ""]
    if "gen" in res:
        g = res["gen"]
        lines += [f"## Greedy generation, {g['new_tokens']} new tokens, FLORAIN hook at layer {g['layer']}", "",
                  "| batch | plain (tok/s) | with FLORAIN (tok/s) | slowdown |", "|---|---|---|---|"]
        for b in (1, 16):
            row = g[f"batch_{b}"]
            lines.append(f"| {b} | {row['plain_tok_s']:.1f} | {row['florain_tok_s']:.1f} | {row['slowdown_pct']:.1f} % |")
        lines += ["", f"Peak RSS {g['peak_rss_mb']:.0f} MB.", ""]
    if "fit" in res:
        f = res["fit"]
        lines += [f"## FLORAIN fit, all heads of layer {f['layer']}, both folds, {f['epochs']} epochs", "",
                  "| batched heads (s) | per-head loop with D×D matrices (s) | speed-up | peak RSS (MB) |", "|---|---|---|---|",
                  f"| {f['batched_s']:.1f} | {f['per_head_loop_s']:.1f} | {f['speedup']:.1f}× | {f['peak_rss_mb']:.0f} |",
                  "", f"Note: {f['note']}.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    import argparse

    from bench.runs import environment, write_json

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--limit", type=int, default=None, help="questions for the MC and fit parts (default: all 817)")
    p.add_argument("--parts", default="mc,gen,fit")
    p.add_argument("--fit-epochs", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--output", default="results")
    a = p.parse_args(argv)
    res = {"command": "python -m bench.perf " + " ".join(argv if argv is not None else sys.argv[1:])}
    for part in a.parts.split(","):
        kwargs = {"model": a.model, "data_dir": a.data_dir, "limit": a.limit}
        kwargs.update({"mc": {"batch_size": a.batch_size}, "gen": {"new_tokens": 50}, "fit": {"epochs": a.fit_epochs}}[part])
        print(f"running {part} ...", flush=True)
        res[part] = run_part(part, **kwargs)
        print(json.dumps(res[part], indent=1), flush=True)
    env = environment("cpu")
    out = Path(a.output)
    write_json(out / "perf.json", {**res, "environment": env})
    (out / "perf.md").write_text(to_markdown(res, env))
    print((out / "perf.md").read_text())


if __name__ == "__main__":
    main()
