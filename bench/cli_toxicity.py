"""``bench toxicity``: train the embedded toxicity scorer and validate scorers against Perspective scores.

Registered in :mod:`bench.cli` with ``app.add_typer(toxicity_app, name="toxicity")``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from bench.cli_common import console, revise_runs
from bench.cli_common import fail as _fail

toxicity_app = typer.Typer(help="Toxicity scorers: train the embedded scorer, validate scorers against Perspective.",
                           no_args_is_help=True)
out_console = Console()


def _fmt(value: object, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _parse_options(raw: list[str]) -> dict[str, dict]:
    """``SCORER.KEY=VALUE`` (VALUE parsed as JSON when it can be) into per-scorer option dicts."""
    out: dict[str, dict] = {}
    for item in raw:
        name_key, sep, value = item.partition("=")
        scorer, dot, key = name_key.partition(".")
        if not sep or not dot or not scorer or not key:
            _fail(f"--option {item!r}: expected SCORER.KEY=VALUE, e.g. perspective.qps=0.5")
        try:
            parsed = json.loads(value)
        except ValueError:
            parsed = value
        out.setdefault(scorer, {})[key] = parsed
    return out


@toxicity_app.command()
def train(
    data_dir: Optional[str] = typer.Option(None, help="Folder holding toxicity/*.jsonl [$BENCH_DATA_DIR]."),
    seed: int = typer.Option(0, help="Seed of the train/held-out split (by prompt)."),
    force: bool = typer.Option(False, help="Retrain even when a current model for this data and seed exists."),
) -> None:
    """Train the embedded scorer on RTP prompt texts, check it on the GPT-2 continuations, cache it (about a minute)."""
    from bench.data.truthfulqa import DataNotFoundError
    from bench.toxicity.data import file_sha256
    from bench.toxicity.embedded import default_dir, is_current, read_metadata, train_embedded_scorer

    meta = read_metadata()
    if not force and is_current(meta) and meta.get("seed") == seed:
        try:
            same = all(file_sha256(v["path"]) == v["sha256"] for v in meta["files"].values())
        except OSError:
            same = False
        if same and (default_dir() / "model.joblib").is_file():
            console.print(f"the embedded scorer in {default_dir()} is up to date (seed {seed}); --force retrains")
            _print_training(meta)
            return
    try:
        meta = train_embedded_scorer(data_dir, seed=seed)
    except (DataNotFoundError, ValueError) as err:
        _fail(str(err))
    console.print(f"saved to {default_dir()}")
    _print_training(meta)


def _ci(r: dict, key: str) -> str:
    """``value [lo, hi]`` of a metric with its bootstrap interval."""
    value, ci = r.get(key), r.get(f"{key}_ci")
    return _fmt(value) + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if value is not None and ci else "")


def _print_training(meta: dict) -> None:
    table = Table(title="embedded toxicity scorer")
    table.add_column("field")
    table.add_column("value")
    n, checks = meta["n_texts"], meta["checks"]
    pool = n["pool"]
    rows = [("model", meta["model_type"]), ("seed", str(meta["seed"])),
            ("train texts", f"{n['train']['total']} RTP prompts ({n['train']['positive']} toxic)"),
            ("held-out prompts", f"{n['heldout_prompts']['total']} ({n['heldout_prompts']['positive']} toxic)"),
            ("not used", f"{pool['steering_part']} RTP prompts of the steering part, {pool['prompted_gens_prompts']} "
                         "prompted_gens prompts, every continuation"),
            ("stack", ", ".join(f"{f} {c:+.3f}" for f, c in zip(meta["stack"]["features"], meta["stack"]["coef"]))
             + f", intercept {meta['stack']['intercept']:+.3f}"),
            ("training time", f"{meta['train_seconds']} s")]
    for c in checks.values():
        rows.append((f"{c['set']} (n {c['n']}, {c['n_positive']} toxic)",
                     f"AUROC {_ci(c, 'auroc')}, Spearman {_ci(c, 'spearman')}"))
    for row in rows:
        table.add_row(*row)
    out_console.print(table)


@toxicity_app.command()
def validate(
    scorer: Optional[list[str]] = typer.Option(None, "--scorer", help="Scorer to validate (repeatable) [embedded, profanity-check]."),
    option: Optional[list[str]] = typer.Option(None, "--option", help="Scorer option SCORER.KEY=VALUE (repeatable), e.g. perspective.qps=0.5."),
    data_dir: Optional[str] = typer.Option(None, help="Folder holding toxicity/*.jsonl [$BENCH_DATA_DIR]."),
    seed: int = typer.Option(0, help="Seed of the held-out prompts and of the bootstrap (must be the embedded scorer's training seed)."),
    resamples: int = typer.Option(1000, min=1, help="Prompt-group bootstrap resamples for the 95 % intervals."),
    output: Optional[Path] = typer.Option(None, help="Write the full report (reliability tables included) to this JSON file."),
) -> None:
    """AUROC and Spearman (bootstrap 95 % intervals) of scorers against Perspective, per set: GPT-2 continuations,
    human continuations, held-out RTP prompts; and task-level EMT / toxicity probability on the continuations."""
    from bench.data.truthfulqa import DataNotFoundError
    from bench.runs import write_json
    from bench.toxicity.base import ScorerNotAvailableError
    from bench.toxicity.validate import DEFAULT_SCORERS, validate_scorers

    names = scorer or list(DEFAULT_SCORERS)
    try:
        report = validate_scorers(names, data_dir, seed, _parse_options(option or []), resamples)
    except (DataNotFoundError, ScorerNotAvailableError, ValueError) as err:
        _fail(str(err))
    _print_validation(report)
    if output is not None:
        write_json(output, report)
        console.print(f"wrote {output}")


def _print_validation(report: dict) -> None:
    table = Table(title=f"toxicity scorers vs Perspective >= 0.5 (95 % intervals: {report['bootstrap']['resamples']} "
                        f"prompt-group bootstrap resamples, seed {report['seed']})")
    for col in ("scorer", "set", "n (toxic)", "AUROC [95 % CI]", "Spearman [95 % CI]", "Brier"):
        table.add_column(col, justify="left" if col in ("scorer", "set") else "right")
    for name, r in report["scorers"].items():
        for key, s in r["sets"].items():
            table.add_row(name, key, f"{s['n']} ({s['n_positive']})", _ci(s, "auroc"),
                          _ci(s, "spearman"), _fmt(s["brier"]))
    table.caption = "; ".join(f"{k}: {v['description']}" for k, v in report["sets"].items())
    out_console.print(table)
    task = Table(title="task level on the prompted_gens prompts' GPT-2 continuations: scorer vs Perspective")
    for col in ("scorer", "prompts", "EMT", "EMT Persp.", "Δ [95 % CI]", "tox. prob.", "Persp.", "Δ [95 % CI]",
                "ρ maxima"):
        task.add_column(col, justify="left" if col == "scorer" else "right")
    for name, r in report["scorers"].items():
        t = r.get("task_level", {})
        if not t.get("n_prompts"):
            continue
        cells = []
        for key in ("expected_max_toxicity", "toxicity_probability"):
            e = t[key]
            lo, hi = e["difference_ci"]
            cells += [_fmt(e["scorer"]["mean"]), _fmt(e["perspective"]["mean"]),
                      f"{e['difference']:+.3f} [{lo:+.3f}, {hi:+.3f}]"]
        task.add_row(name, str(t["n_prompts"]), *cells, _fmt(t["max_spearman"]))
    out_console.print(task)


@toxicity_app.command()
def candidates(
    data_dir: Optional[str] = typer.Option(None, help="Folder holding toxicity/*.jsonl [$BENCH_DATA_DIR]."),
    seed: int = typer.Option(0, help="Seed of the train/held-out split of the scorer's RTP prompts."),
    output: Optional[Path] = typer.Option(None, help="Write the comparison to this JSON file."),
) -> None:
    """Held-out-prompt AUROC of the candidate embedded models and the rule's choice (continuations play no part)."""
    from bench.data.truthfulqa import DataNotFoundError
    from bench.runs import write_json
    from bench.toxicity.validate import compare_candidates

    try:
        report = compare_candidates(data_dir, seed)
    except (DataNotFoundError, ValueError) as err:
        _fail(str(err))
    table = Table(title=f"candidate embedded scorers (train {report['n_train']} RTP prompts, "
                        f"held-out {report['n_heldout']} RTP prompts)")
    for col in ("candidate", "AUROC", "Spearman", "Brier"):
        table.add_column(col, justify="left" if col == "candidate" else "right")
    for name, r in report["candidates"].items():
        table.add_row(name + ("  ← chosen" if name == report["chosen"] else ""), _fmt(r["auroc"], 4),
                      _fmt(r["spearman"]), _fmt(r["brier"]))
    out_console.print(table)
    console.print(f"rule: {report['rule']}")
    if output is not None:
        write_json(output, report)
        console.print(f"wrote {output}")


@toxicity_app.command()
def rescore(
    runs: list[Path] = typer.Argument(..., help="Finished toxicity run directories (each with samples_foldK.jsonl)."),
    data_dir: Optional[str] = typer.Option(None, help="Folder holding toxicity/*.jsonl, to train the embedded scorer if needed [$BENCH_DATA_DIR]."),
) -> None:
    """Re-score runs' saved samples with today's scorer: toxicity numbers only (fluency, diversity kept)."""
    from bench.toxicity.rescore import rescore_run, run_scorer

    revise_runs(runs, "scorer", lambda cfg: run_scorer(cfg, data_dir),
                lambda run_dir, scorer: rescore_run(run_dir, scorer, echo=console.print))
