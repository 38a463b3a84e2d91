"""Where the harness keeps caches and looks for data. Override with environment variables."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$BENCH_CACHE_DIR``, else ``~/.cache/bench``: models, activations (never inside the repository)."""
    return Path(os.environ.get("BENCH_CACHE_DIR") or Path.home() / ".cache" / "bench")


def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


def activation_cache_dir() -> Path:
    """``$BENCH_ACTIVATION_CACHE``, else ``<cache_dir>/activations``."""
    env = os.environ.get("BENCH_ACTIVATION_CACHE")
    return Path(env) if env else cache_dir() / "activations"


def data_roots(data_dir: str | Path | None) -> list[Path]:
    """The folders data files are looked for in, in order: ``--data-dir``, then ``$BENCH_DATA_DIR`` (unset or empty
    ones left out)."""
    return [Path(d) for d in (data_dir, os.environ.get("BENCH_DATA_DIR")) if d]


def find_data_file(data_dir: str | Path | None, *relative: str | Path) -> tuple[Path | None, list[Path]]:
    """The one data-file locator: each ``relative`` path under each of :func:`data_roots`, in that order (root
    by root). Returns the first that is a file (None if none) and every candidate tried up to it, for the caller's
    error message."""
    tried: list[Path] = []
    for root in data_roots(data_dir):
        for rel in relative:
            tried.append(root / rel)
            if tried[-1].is_file():
                return tried[-1], tried
    return None, tried
