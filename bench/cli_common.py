"""What every ``bench`` command module shares: the stderr console and the error exit."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import typer
from rich.console import Console

from bench.runs import RunFolder

if TYPE_CHECKING:
    from bench.interventions import Method

console = Console(stderr=True)


def fail(message: str) -> NoReturn:
    """Print ``error: message`` on stderr and exit with status 2 (a bad input or a missing resource)."""
    console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(2)


def revise_runs(runs: list[Path], kind: str, build: Callable[[dict], object],
                revise: Callable[[Path, object], object]) -> None:
    """Revise finished runs from their saved outputs (``bench judge rejudge``, ``bench toxicity rescore``): the
    instrument each run's config names under ``kind`` (``judge``, ``scorer``) with its options is built once."""
    from bench.data.truthfulqa import DataNotFoundError
    from bench.toxicity.base import ScorerNotAvailableError

    built: dict[str, object] = {}
    for run_dir in runs:
        try:
            results = RunFolder(run_dir).read_results()
            cfg = results["config"]
            if results.get(kind) is None:  # checked before the instrument is built (an embedded one trains first)
                what, verb = ("judged answers", "re-judge") if kind == "judge" else ("scored samples", "re-score")
                raise ValueError(f"it has no {what} (task {cfg.get('task')!r}); nothing to {verb}")
            key = json.dumps([cfg.get(kind), cfg.get(f"{kind}_options")], sort_keys=True, default=str)
            if key not in built:  # built (and trained) once per name and options
                built[key] = build(cfg)
            revise(run_dir, built[key])
        except (OSError, KeyError, DataNotFoundError, ScorerNotAvailableError, ValueError) as err:
            fail(f"{run_dir}: {err}")


def check_layer_flag(method: str, layer: int | None, iti_hint: str = "-O layer=N") -> Method:
    """The registered method; refuses ``--layer`` for one that does not act at one chosen layer (it would be
    ignored silently). ``iti_hint``: how this command fixes ITI's or CAA's own layer option."""
    from bench.interventions import get_method, load_methods

    try:
        m = get_method(method)
    except ValueError as err:
        fail(str(err))
    if layer is not None and not m.needs_layer:
        hint = {"iti": f" ITI chooses heads across all layers; to restrict it to one layer use {iti_hint}.",
                "caa": " CAA chooses its layer per fold on the fold's validation questions; to fix it use "
                       f"{iti_hint}."}.get(method, "")
        fail(f"--layer does not apply to --method {method}: it does not act at one chosen layer.{hint} "
             "Methods that take --layer: " + ", ".join(n for n, x in load_methods().items() if x.needs_layer))
    return m
