"""One progress helper for the harness's long loops (scoring, decoding, capture, the method fits).

Progress goes to stderr (stdout is for results: tables, JSON). On a terminal it is a transient rich bar. When
stderr is not a terminal (a ``nohup … > log 2>&1`` run, a cluster job) a bar cannot draw, so it writes a plain
line every ``BENCH_PROGRESS_SECONDS`` seconds (default 60) instead: a 50-minute fit shows where it is in its log.
A loop shorter than that interval writes nothing. Without ``rich`` (a bare torch + transformers machine, e.g. the
GPU check) or without a label it shows nothing.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

#: ``advance(n, **fields)``: ``n`` more steps done; ``fields`` (e.g. ``loss=0.3``) are shown beside the count.
Advance = Callable[..., None]

#: Seconds between two plain progress lines when the output is not a terminal (override with the environment).
DEFAULT_SECONDS = 60.0


def _noop(n: int = 1, **fields: float) -> None:
    return None


def _fields(fields: dict[str, float]) -> str:
    return "".join(f", {k} {v:.4g}" for k, v in fields.items())


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}h{m % 60:02d}m" if m >= 60 else f"{m}m{s:02d}s"


class LogLines:
    """Plain progress lines, at most one per ``interval`` seconds, for output that is not a terminal."""

    def __init__(self, label: str, total: int, unit: str, interval: float, write: Callable[[str], None]):
        self.label, self.total, self.unit, self.interval, self.write = label, total, unit, interval, write
        self.done, self.start = 0, time.monotonic()
        self.last = self.start

    def advance(self, n: int = 1, **fields: float) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last < self.interval:
            return
        self.last = now
        elapsed = now - self.start
        share = self.done / self.total if self.total else 1.0
        left = f", about {_clock(elapsed / share - elapsed)} left" if 0 < share < 1 else ""
        self.write(f"{self.label}: {self.done}/{self.total}{self.unit} ({100 * share:.0f} %), "
                   f"{_clock(elapsed)} elapsed{left}{_fields(fields)}")


def interval() -> float:
    """Seconds between plain progress lines: ``$BENCH_PROGRESS_SECONDS`` (a finite number ≥ 0) or 60."""
    raw = os.environ.get("BENCH_PROGRESS_SECONDS", "")
    try:
        value = float(raw) if raw else DEFAULT_SECONDS
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"BENCH_PROGRESS_SECONDS must be a number of seconds ≥ 0, got {raw!r}")
    return value


@contextmanager
def progress_bar(label: str | None, total: int, unit: str = "") -> Iterator[Advance]:
    """Yield ``advance(n=1, **fields)`` for a loop of ``total`` steps labelled ``label`` (nothing shown when
    ``None``); ``unit`` (e.g. ``" epochs"``) follows the count."""
    seconds = interval()  # checked on every path, so a bad value is reported wherever the command runs
    try:
        from rich.console import Console
        from rich.markup import escape
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
    except ImportError:  # a bare torch + transformers machine (e.g. the GPU check)
        yield _noop
        return
    if label is None:
        yield _noop
        return
    console = Console(stderr=True)
    if not console.is_terminal:
        yield LogLines(label, total, unit, seconds, lambda line: print(line, file=sys.stderr, flush=True)).advance
        return
    columns = (TextColumn("[bold]{task.description}"), BarColumn(),
               TextColumn("{task.completed}/{task.total}" + escape(unit) + "{task.fields[text]}"), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task(escape(label), total=total, text="")
        yield lambda n=1, **fields: bar.update(task, advance=n, text=escape(_fields(fields)))
