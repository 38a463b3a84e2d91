"""A real single-node Slurm cluster on this machine for tests (started by ``scripts/slurm-local.sh up``).

Use the session fixture (the import is what makes pytest see it)::

    from slurm_cluster import slurm_cluster  # noqa: F401

    pytestmark = pytest.mark.usefixtures("slurm_cluster")

or call :func:`ensure_cluster` for the client environment. The cluster is started on first use (Slurm and munge
are installed with apt when missing) and is left running at the end, so later sessions reuse it; stop it with
``scripts/slurm-local.sh down``. When it cannot start, the tests fail with the script's output: they never skip.
"""

from __future__ import annotations

import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "slurm-local.sh"
# apt-get install on a machine without Slurm takes about 15 s; a stuck apt lock or mirror gets this long
UP_TIMEOUT_S = 600

_lock = threading.Lock()
_env: dict[str, str] | None = None


def _parse_exports(text: str) -> dict[str, str]:
    """The ``export NAME=VALUE`` lines of the script's stdout as a dict (values are plain paths, never quoted)."""
    env: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("export ") and "=" in line:
            name, value = line[len("export ") :].split("=", 1)
            env[name.strip()] = value.strip()
    return env


def _up() -> dict[str, str]:
    """Run ``slurm-local.sh up``; the client environment it prints, or RuntimeError with its output."""
    cmd = ["bash", str(SCRIPT), "up"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=UP_TIMEOUT_S, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as e:
        raise RuntimeError(f"{' '.join(cmd)} did not finish in {UP_TIMEOUT_S} s\n{e.stdout or ''}{e.stderr or ''}") from e
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{proc.stdout}{proc.stderr}")
    env = _parse_exports(proc.stdout)
    if "SLURM_CONF" not in env:
        raise RuntimeError(f"{' '.join(cmd)} printed no 'export SLURM_CONF=...':\n{proc.stdout}{proc.stderr}")
    return env


def ensure_cluster() -> dict[str, str]:
    """Start the local cluster once per process (a running one is reused); the variables a client needs."""
    global _env
    with _lock:
        if _env is None:
            _env = _up()
        return dict(_env)


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[dict[str, str]]:
    """The running local cluster: its client variables (SLURM_CONF) are set in os.environ for the session."""
    env = ensure_cluster()
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        yield env
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
