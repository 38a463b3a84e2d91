"""One benchmark run: load model and data, fit the method per fold, evaluate, write the run directory."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from bench.data.truthfulqa import checksum, load_truthfulqa, make_folds
from bench.interventions import get_method
from bench.methods import FitContext
from bench.models import REGISTRY, load_model, resolve_alias
from bench.paths import repo_root
from bench.report import results_table
from bench.runs import (
    SCHEMA_VERSION,
    combine_folds,
    config_hash,
    environment,
    new_run_id,
    now_iso,
    peak_memory_mb,
    summarise,
    write_json,
)
from bench.sites import SITES
from bench.tasks.lm_eval_task import evaluate_lm_eval, parse_tasks
from bench.tasks.truthfulqa_mc import evaluate_mc

TASKS = ("truthfulqa-mc",)
MC_METRICS = ("mc1", "mc2", "mc3")


@dataclass
class RunConfig:
    """Everything that determines a run's numbers (recorded verbatim in results.json)."""

    method: str = "florain"
    model: str = "smollm2-135m"
    task: str = "truthfulqa-mc"
    layer: int | None = None
    site: str = "heads"
    folds: int = 2
    val_ratio: float = 0.2
    seed: int = 42
    limit: int | None = None
    prompt_mode: str = "iti"
    options: dict = field(default_factory=dict)  # method hyper-parameters
    eval_batch_size: int = 16
    prefix_cache: bool = True
    device: str | None = None
    dtype: str | None = None


def _identity_config(cfg: RunConfig) -> dict:
    d = asdict(cfg)
    d.pop("eval_batch_size")  # does not change the numbers beyond float noise
    return d


def run(cfg: RunConfig, output: Path | None = None, data_dir: str | None = None, resume: bool = False,
        echo=print) -> dict:
    """Execute a run and return its results dict (also written to ``<output>/results.json``)."""
    t0 = time.perf_counter()
    method = get_method(cfg.method)
    cfg.options = {k: v for k, v in cfg.options.items() if k in method.options}
    if cfg.task not in TASKS and not cfg.task.startswith("lm-eval:"):
        raise ValueError(f"unknown task {cfg.task!r}; valid: {', '.join(TASKS)}, lm-eval:TASK[,TASK]")
    lm_eval_tasks = parse_tasks(cfg.task) if cfg.task.startswith("lm-eval:") else None
    if cfg.site not in SITES:
        raise ValueError(f"unknown site {cfg.site!r}; valid: {', '.join(SITES)}")
    if cfg.limit is not None and cfg.limit < cfg.folds:
        raise ValueError(f"--limit {cfg.limit} is too small for {cfg.folds} folds")
    if cfg.model not in REGISTRY and "/" not in cfg.model and not Path(cfg.model).is_dir():
        resolve_alias(cfg.model)  # raises, listing the known aliases
    questions, source = load_truthfulqa(data_dir)
    if cfg.limit is not None:
        if cfg.limit > len(questions):
            echo(f"--limit {cfg.limit} is larger than the data ({len(questions)} questions): using all of them")
        questions = questions[: cfg.limit]
    lm = load_model(cfg.model, cfg.device, cfg.dtype)
    env = environment(str(next(lm.model.parameters()).device))  # read at the start: the code that runs
    if method.needs_layer:
        if cfg.layer is None:
            if lm.default_layer is None:
                raise ValueError(f"{cfg.model} has no default layer; pass --layer (0..{lm.spec.n_layers - 1})")
            cfg.layer = lm.default_layer
        lm.spec.check_layer(cfg.layer)
    else:
        cfg.layer = None
    out = Path(output) if output else repo_root() / "results" / "runs" / new_run_id(cfg.model, cfg.method, cfg.task)
    ident = _identity_config(cfg)
    marker = out / "run_config.json"
    if out.exists() and (out / "results.json").exists() and not resume:
        raise FileExistsError(f"{out} already holds a finished run; choose another --output or pass --resume")
    if resume and marker.exists():
        previous = json.loads(marker.read_text())
        if previous.get("hash") != config_hash(ident):
            raise ValueError(f"cannot resume {out}: it was started with a different configuration")
    write_json(marker, {"hash": config_hash(ident), "config": ident})
    data_sum = checksum(questions)
    folds = make_folds(len(questions), cfg.folds, cfg.val_ratio, cfg.seed)
    fold_results = []
    for fold in folds:
        fold_file = out / f"fold_{fold.fold}.json"
        if resume and fold_file.exists():
            echo(f"fold {fold.fold}: already done, reusing {fold_file}")
            fold_results.append(json.loads(fold_file.read_text()))
            continue
        tf = time.perf_counter()
        ctx = FitContext(lm, questions, fold, cfg.layer if cfg.layer is not None else -1, cfg.site,
                         dict(cfg.options), data_sum)
        intervention = method.fit(ctx)
        fit_s = time.perf_counter() - tf
        int_dir = None
        if intervention is not None:
            int_dir = intervention.save_pretrained(out / f"intervention_fold{fold.fold}")
            where = f"layer(s) {intervention.layers}" if intervention.layers else "the prompt"
            echo(f"fold {fold.fold}: fitted {cfg.method} at {where} in {fit_s:.1f} s → {int_dir}")
        te = time.perf_counter()
        test_qs = [questions[i] for i in fold.test]
        if lm_eval_tasks:
            if intervention is not None and not intervention.modules:
                raise ValueError(f"{cfg.method} is prompt-only; lm-eval tasks take --num_fewshot instead")
            fold_metrics = evaluate_lm_eval(lm, intervention, lm_eval_tasks, test_qs, out / f"lm_eval_fold{fold.fold}",
                                            cfg.eval_batch_size)
            records = []
        else:
            records = evaluate_mc(lm, test_qs, intervention, cfg.prompt_mode, cfg.eval_batch_size, cfg.prefix_cache,
                                  fewshot=intervention.prompt_prefix if intervention else "", label=f"fold {fold.fold} MC")
            fold_metrics = {m: summarise([r[m] for r in records]) for m in MC_METRICS}
        eval_s = time.perf_counter() - te
        fr = {
            "fold": fold.fold, "n_train": len(fold.train), "n_val": len(fold.val), "n_test": len(fold.test),
            "metrics": fold_metrics,
            "timings": {"fit_s": fit_s, "eval_s": eval_s},
            "intervention": str(int_dir.relative_to(out)) if int_dir else None,
            "intervention_info": {k: v for k, v in (intervention.config if intervention else {}).items()
                                  if k not in ("model", "data_checksum")},
            "per_question": records,
        }
        write_json(fold_file, fr)
        fold_results.append(fr)
        echo(f"fold {fold.fold}: " + ", ".join(f"{m.upper()} {v['mean']:.4f}" for m, v in fr["metrics"].items())
             + f" ({len(test_qs)} questions, eval {eval_s:.1f} s)")
    results = {
        "schema_version": SCHEMA_VERSION,
        "created": now_iso(),
        "config": {**asdict(cfg)},
        "model": {"name": lm.name, "identity": lm.identity, "spec": asdict(lm.spec)},
        "data": {"truthfulqa": source, "checksum": data_sum, "n_questions": len(questions)},
        "environment": env,
        "metrics": {m: combine_folds([f["metrics"][m] for f in fold_results]) for m in fold_results[0]["metrics"]},
        "folds": [{k: v for k, v in f.items() if k != "per_question"} for f in fold_results],
        "timings": {"total_s": time.perf_counter() - t0,
                    "fit_s": sum(f["timings"]["fit_s"] for f in fold_results),
                    "eval_s": sum(f["timings"]["eval_s"] for f in fold_results)},
        "peak_memory_mb": peak_memory_mb(),
        "torch_threads": torch.get_num_threads(),
    }
    with (out / ".per_question.jsonl.tmp").open("w") as fh:
        for f in fold_results:
            for r in f["per_question"]:
                fh.write(json.dumps({"fold": f["fold"], **r}) + "\n")
    (out / ".per_question.jsonl.tmp").replace(out / "per_question.jsonl")
    write_json(out / "results.json", results)
    (out / "results.md").write_text(results_table([results], tuple(results["metrics"])) + "\n")
    results["run_dir"] = str(out)
    return results
