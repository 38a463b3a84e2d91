"""Run records: provenance read once per process."""

from __future__ import annotations

import pytest


def test_the_git_state_is_read_once_per_process(monkeypatch):
    """A long sweep records the commit it started from for every point, not whatever lands while it runs."""
    import subprocess

    from bench import runs

    runs._git_state.cache_clear()
    first = runs.git_commit()
    real = subprocess.run

    def no_git(args, *a, **k):
        if args and args[0] == "git":
            pytest.fail("git was asked again")
        return real(args, *a, **k)

    monkeypatch.setattr(subprocess, "run", no_git)
    assert runs.git_commit() == first and runs.environment("cpu")["git"] == first
    assert first["commit"] is None or len(first["commit"]) == 40
