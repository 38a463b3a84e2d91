"""Run records: provenance read once per process."""

from __future__ import annotations

import json

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


def test_run_folder_keeps_per_question_records_as_reproducible_gzip_and_reads_earlier_plain_files(tmp_path):
    from bench.runs import RunFolder

    folder = RunFolder(tmp_path / "run")
    recs = [{"fold": 0, "index": i, "mc2": i / 10, "answer": f"answer {i} ü"} for i in range(5)]
    folder.path.mkdir()
    folder.legacy_per_question.write_text("".join(json.dumps(r) + "\n" for r in recs[:2]))
    assert folder.read_per_question() == recs[:2]  # a run written before the records were compressed
    folder.write_per_question(recs)
    first = folder.per_question.read_bytes()
    assert not folder.legacy_per_question.exists() and folder.read_per_question() == recs
    folder.write_per_question(recs)
    assert folder.per_question.read_bytes() == first  # no timestamp: the same records give the same bytes
    with pytest.raises(FileNotFoundError, match="no results.json"):
        folder.read_results()
    with pytest.raises(FileNotFoundError, match="per_question.jsonl.gz"):
        RunFolder(tmp_path / "empty").read_per_question()
