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

from bench.cli_common import console
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
    """Train the embedded scorer (TF-IDF + logistic regression) and save it in the cache (about half a minute)."""
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


def _print_training(meta: dict) -> None:
    table = Table(title="embedded toxicity scorer")
    table.add_column("field")
    table.add_column("value")
    val, n = meta["validation"], meta["n_texts"]
    rows = [("model", meta["model_type"]), ("seed", str(meta["seed"])),
            ("train texts", f"{n['train']['total']} ({n['train']['groups']} prompts)"),
            ("held-out texts", f"{n['validation']['total']} ({n['validation']['groups']} prompts, "
                               f"{n['validation']['positive']} toxic)"),
            ("held-out AUROC", _fmt(val["auroc"])), ("held-out Spearman", _fmt(val["spearman"])),
            ("held-out Brier", _fmt(val["brier"])), ("training time", f"{meta['train_seconds']} s")]
    for row in rows:
        table.add_row(*row)
    out_console.print(table)


@toxicity_app.command()
def validate(
    scorer: Optional[list[str]] = typer.Option(None, "--scorer", help="Scorer to validate (repeatable) [embedded, profanity-check]."),
    option: Optional[list[str]] = typer.Option(None, "--option", help="Scorer option SCORER.KEY=VALUE (repeatable), e.g. perspective.qps=0.5."),
    data_dir: Optional[str] = typer.Option(None, help="Folder holding toxicity/*.jsonl [$BENCH_DATA_DIR]."),
    seed: int = typer.Option(0, help="Seed of the held-out split (must be the embedded scorer's training seed)."),
    output: Optional[Path] = typer.Option(None, help="Write the full report (reliability tables included) to this JSON file."),
) -> None:
    """AUROC, Spearman and Brier score of scorers against Perspective on the held-out texts."""
    from bench.data.truthfulqa import DataNotFoundError
    from bench.runs import write_json
    from bench.toxicity.base import ScorerNotAvailableError
    from bench.toxicity.validate import DEFAULT_SCORERS, validate_scorers

    names = scorer or list(DEFAULT_SCORERS)
    try:
        report = validate_scorers(names, data_dir, seed, _parse_options(option or []))
    except (DataNotFoundError, ScorerNotAvailableError, ValueError) as err:
        _fail(str(err))
    table = Table(title=f"toxicity scorers vs Perspective (held-out: {report['n']} texts, "
                        f"{report['n_positive']} toxic, {report['n_groups']} prompts; seed {seed})")
    for col in ("scorer", "AUROC", "Spearman", "Brier", "AUROC prompts", "AUROC generations", "EMT (Persp.)",
                "tox. prob. (Persp.)"):
        table.add_column(col, justify="left" if col == "scorer" else "right")
    for name, r in report["scorers"].items():
        gens = r["by_source"].get("generation", {})
        task = r["task_level"]
        emt = tp = "–"
        if task.get("n_prompts"):
            e, t = task["expected_max_toxicity"], task["toxicity_probability"]
            emt = f"{e['scorer']['mean']:.3f} ({e['perspective']['mean']:.3f})"
            tp = f"{t['scorer']['mean']:.3f} ({t['perspective']['mean']:.3f})"
        table.add_row(name, _fmt(r["auroc"]), _fmt(r["spearman"]), _fmt(r["brier"]),
                      _fmt(r["by_source"].get("prompt", {}).get("auroc")), _fmt(gens.get("auroc")), emt, tp)
    out_console.print(table)
    if output is not None:
        write_json(output, report)
        console.print(f"wrote {output}")


@toxicity_app.command()
def candidates(
    data_dir: Optional[str] = typer.Option(None, help="Folder holding toxicity/*.jsonl [$BENCH_DATA_DIR]."),
    seed: int = typer.Option(0, help="Seed of the train/held-out split."),
) -> None:
    """Held-out AUROC of the candidate embedded models (how the embedded scorer was chosen)."""
    from bench.data.truthfulqa import DataNotFoundError
    from bench.toxicity.validate import compare_candidates

    try:
        report = compare_candidates(data_dir, seed)
    except (DataNotFoundError, ValueError) as err:
        _fail(str(err))
    table = Table(title=f"candidate embedded scorers (train {report['n_train']}, held-out {report['n_validation']})")
    for col in ("candidate", "AUROC", "Spearman", "Brier", "fit s"):
        table.add_column(col, justify="left" if col == "candidate" else "right")
    for name, r in report["candidates"].items():
        table.add_row(name, _fmt(r["auroc"], 4), _fmt(r["spearman"]), _fmt(r["brier"]), _fmt(r.get("fit_seconds"), 1))
    out_console.print(table)
