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


def test_dirty_means_changed_code_not_rewritten_results(monkeypatch, tmp_path):
    """A run that rewrites a committed table (reproduce does) leaves the next process's code clean."""
    import subprocess

    from bench import runs

    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "table.md").write_text("old\n")
    (tmp_path / "code.py").write_text("x = 1\n")
    git("init", "-q")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    monkeypatch.setattr(runs, "repo_root", lambda: tmp_path)

    def state():
        runs._git_state.cache_clear()
        return runs.git_commit()

    (tmp_path / "results" / "table.md").write_text("new\n")
    clean = state()
    assert clean["dirty"] is False and len(clean["commit"]) == 40
    (tmp_path / "code.py").write_text("x = 2\n")
    assert state()["dirty"] is True
    runs._git_state.cache_clear()
