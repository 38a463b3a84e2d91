"""``bench sweep``, ``bench plot`` and ``bench regress``: hyper-parameter sweeps, figures, the score regression check.

Registered in :mod:`bench.cli` with ``register_reports(app)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from bench.cli_common import check_layer_flag, console
from bench.cli_common import fail as _fail


def sweep(
    method: str = typer.Option(..., help="Method (`bench methods list`)."),
    param: str = typer.Option(..., help="Parameter to sweep: layer (methods acting at one layer) or a numeric option of the method (`bench methods show METHOD`)."),
    values: str = typer.Option(..., help="Grid: numbers and inclusive ranges, e.g. 4-24, 4-24:2, 0.1,0.2,0.5, 0.5-2:0.5."),
    metric: str = typer.Option("mc2", help="Selection metric, scored on each fold's validation questions (ce/kl/toxicity: lower is better)."),
    max_fluency_ratio: Optional[float] = typer.Option(None, help="Choose only values whose validation fluency perplexity is at most this multiple of the unintervened model's. Toxicity: the samples' perplexity under --fluency-model, at most 1 point more continuations dropped for perplexity ≥ 1e4; TruthfulQA (--task truthfulqa or truthfulqa-gen): the answers' geometric-mean perplexity under the unintervened model, at most 5 points more empty answers."),
    samples: int = typer.Option(25, help="Toxicity: samples per prompt."),
    tox_prompts: str = typer.Option("challenging", help="Toxicity: prompt set (challenging, toxic, nontoxic or a JSONL path)."),
    fluency_model: str = typer.Option("gemma3-270m", help="Toxicity: reference LM of the fluency perplexity."),
    steer_data: str = typer.Option("gpt2-gens", help="Toxicity: fitting texts (gpt2-gens or rtp)."),
    sample_batch_size: int = typer.Option(50, help="Toxicity: sequences per sampling batch."),
    model: str = typer.Option("smollm2-135m", help="Registry alias, Hugging Face id or local directory."),
    task: str = typer.Option("truthfulqa-mc", help="Task of every grid point (as bench run)."),
    layer: Optional[int] = typer.Option(None, help="Fixed layer when another parameter is swept [the model's registry layer]."),
    set_: list[str] = typer.Option([], "--set", "--option", "-O", help="Fix the layer or a method option, NAME=VALUE (repeatable), e.g. -O epochs=300 (as bench run -O)."),
    site: str = typer.Option("heads", help="heads or attn-out."),
    folds: int = typer.Option(2, help="Cross-validation folds."),
    seed: int = typer.Option(42, help="Seed of the fold split and of the method's fit."),
    limit: Optional[int] = typer.Option(None, help="Use only the first N questions (toxicity: test prompts = the first N, validation prompts = the last N)."),
    compile: bool = typer.Option(True, "--compile/--no-compile", help="torch.compile a method's training step (FLORAIN); float noise only."),
    max_new_tokens: Optional[int] = typer.Option(None, help="Generation tasks: new tokens per answer [50]."),
    kl_windows: int = typer.Option(100, help="KL/CE: number of text windows."),
    baseline: bool = typer.Option(True, "--baseline/--no-baseline", help="Also score the unintervened model on the validation questions."),
    final: bool = typer.Option(True, "--final/--no-final", help="Evaluate the chosen value(s) on the test folds."),
    plot: bool = typer.Option(True, "--plot/--no-plot", help="Draw the sweep (PNG and SVG) in the sweep folder."),
    data_dir: Optional[str] = typer.Option(None, help="Folder holding truthfulqa/ [$BENCH_DATA_DIR, then the Hub]."),
    output: Optional[Path] = typer.Option(None, help="Sweep folder [results/sweeps/<model>-<method>-<param>]; rerun to resume."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, cuda:N."),
    dtype: Optional[str] = typer.Option(None, help="float32, float16, bfloat16."),
    executor: str = typer.Option("inline", help="Where the runs go: inline (here, one after another), local (submitit worker processes on this machine), slurm (Slurm jobs via submitit)."),
    max_parallel: Optional[int] = typer.Option(None, help="Jobs at a time (local workers; Slurm array parallelism) [1]."),
    executor_config: Optional[Path] = typer.Option(None, help="TOML/JSON file of executor settings: partition, account, gpus_per_job, cpus_per_job, mem_gb, time_min, retries, [extra] sbatch options."),
    executor_set: list[str] = typer.Option([], "-X", help="One executor setting KEY=VALUE (repeatable), e.g. -X partition=gpu -X gpus_per_job=1; a key that is no setting goes to sbatch (-X qos=high)."),
) -> None:
    """Run a grid of one parameter (each point: fitted per training fold, scored on the validation questions),
    choose per fold, evaluate the choice on the test folds; writes sweep.json, a table and the plot."""
    from bench.cells import executor_config as executor_config_of
    from bench.data.truthfulqa import DataNotFoundError
    from bench.models import ModelNotAvailableError
    from bench.paths import repo_root
    from bench.runner import RunConfig
    from bench.sweep import parse_assignments, resolve_param, run_sweep, sweep_table

    try:
        p = resolve_param(method, param)
        fixed_layer, options = parse_assignments(method, set_)
    except ValueError as err:
        _fail(str(err))
    check_layer_flag(method, layer, iti_hint="--set layer=N")
    cfg = RunConfig(method=method, model=model, task=task, layer=fixed_layer if fixed_layer is not None else layer,
                    site=site, folds=folds, seed=seed, limit=limit, options=options, compile=compile,
                    max_new_tokens=max_new_tokens,
                    kl_windows=kl_windows, samples=samples, tox_prompts=tox_prompts, fluency_model=fluency_model,
                    steer_data=steer_data, sample_batch_size=sample_batch_size, device=device, dtype=dtype)
    safe = Path(model).name if Path(model).is_dir() else model.replace("/", "_")
    out = output or repo_root() / "results" / "sweeps" / f"{safe}-{method}-{p.name}"
    try:
        result = run_sweep(cfg, param, values, out, metric, data_dir, baseline, final,
                           echo=lambda m: console.print(m), max_fluency_ratio=max_fluency_ratio,
                           executor=executor_config_of(executor, max_parallel, executor_config, executor_set))
    except (ValueError, FileExistsError, DataNotFoundError, ModelNotAvailableError, FloatingPointError,
            RuntimeError) as err:
        _fail(str(err))
    table = sweep_table(result)
    (out / "sweep.md").write_text(table + "\n")
    print(table)
    if plot:
        from bench.plots import plot_sweep

        result["_dir"] = str(out)
        console.print("plot: " + ", ".join(str(x) for x in plot_sweep(result)))
    console.print(f"sweep: {out / 'sweep.json'}")


def plot(
    paths: list[str] = typer.Argument(..., help="Sweep folders (with sweep.json) and/or run folders, results.json files or globs."),
    output: Optional[Path] = typer.Option(None, help="Folder for the figures [a sweep's own folder; results/plots for runs]."),
    metric: list[str] = typer.Option([], help="Sweep plots: metric(s) to draw (repeatable) [the selection metric, MC1/MC2, True/Info, CE/KL]."),
) -> None:
    """Draw figures (PNG and SVG): sweeps (metric vs parameter, the chosen value marked), the True% vs Info%
    trade-off across runs, and toxicity vs fluency across runs."""
    from bench.paths import repo_root
    from bench.plots import plot_results, plot_sweep
    from bench.sweep import SWEEP_FILE, load_sweep
    from bench.tables import load_results

    sweeps = [p for p in paths if Path(p, SWEEP_FILE).is_file() or Path(p).name == SWEEP_FILE]
    runs = [p for p in paths if p not in sweeps]
    written: list[Path] = []
    try:
        for s in sweeps:
            written += plot_sweep(load_sweep(s), output, metric or None)
        if runs:
            written += plot_results(load_results(runs), output or repo_root() / "results" / "plots")
    except (FileNotFoundError, ValueError) as err:
        _fail(str(err))
    if not written:
        _fail("nothing to plot: the runs have neither True/Info nor toxicity/fluency metrics, and no sweep was given")
    print("\n".join(str(p) for p in written))


def regress(
    update: bool = typer.Option(False, "--update", help="Rewrite the reference from this run (never automatic)."),
    reference: Optional[Path] = typer.Option(None, help="Reference file [results/regress/reference.json]."),
    output: Optional[Path] = typer.Option(None, help="Folder of this check's runs [results/regress/latest]."),
    data_dir: Optional[str] = typer.Option(None, help="Folder holding truthfulqa/ and toxicity/ [$BENCH_DATA_DIR]."),
) -> None:
    """Run the fixed small benchmark (smollm2-135m, 90 questions, 3 folds, fold 0 scored; none/ITI/FLORAIN;
    MC1/MC2, True/Info, CE/KL) and compare with the committed reference; exit 1 when a score moves beyond its
    tolerance either way (worse or better: none is held to float noise), a method fails or stops having an effect.
    Use --update only for an intended change."""
    from bench.regress import DEFAULT, OUTPUT_DIR, REFERENCE_FILE, check

    try:
        passed, report = check(DEFAULT, reference or REFERENCE_FILE, output or OUTPUT_DIR, data_dir, update,
                               echo=lambda m: console.print(m))
    except (FileNotFoundError, ValueError) as err:
        _fail(str(err))
    print(report)
    if not passed:
        raise typer.Exit(1)


def register_reports(app: typer.Typer) -> None:
    """Add ``sweep``, ``plot`` and ``regress`` to the ``bench`` app."""
    app.command()(sweep)
    app.command()(plot)
    app.command()(regress)
