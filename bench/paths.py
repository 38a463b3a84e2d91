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
