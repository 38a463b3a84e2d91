"""One progress bar helper for the harness's long loops: a transient rich bar when ``rich`` is installed and a
label is given, otherwise nothing (so the scoring and decoding code runs where only torch and transformers are)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager


@contextmanager
def progress_bar(label: str | None, total: int) -> Iterator[Callable[[int], None]]:
    """Yield ``advance(n)``; draws a transient bar of ``total`` steps labelled ``label`` (none when ``None``)."""
    try:
        from rich.progress import Progress
    except ImportError:  # a bare torch + transformers machine (e.g. the GPU check)
        yield lambda n: None
        return
    with Progress(transient=True, disable=label is None) as bar:
        task = bar.add_task(label or "", total=total)
        yield lambda n: bar.advance(task, n)
