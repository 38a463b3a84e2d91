"""One writer per run folder: a second process is refused naming the first; a lock left by a killed run is
taken over; the lock is released however the run ends."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from bench.cli import app
from bench.runs import RunLockedError, run_lock

runner = CliRunner()


def test_a_second_writer_is_refused_naming_the_holder(tiny_dir, tqa_dir, tmp_path):
    out = tmp_path / "run"
    args = ["run", "--method", "none", "--model", str(tiny_dir), "--data-dir", str(tqa_dir), "--limit", "4",
            "--output", str(out)]
    with run_lock(out):  # another process holds the folder (this one, for the test)
        r = runner.invoke(app, args)
        text = " ".join(r.output.split())
        assert r.exit_code == 2 and f"is being written by process {os.getpid()}" in text, r.output
        assert not (out / "run_config.json").exists()
        with pytest.raises(RunLockedError):
            with run_lock(out):
                pass
    r = runner.invoke(app, args)  # released: the run goes ahead, and releases it in turn
    assert r.exit_code == 0, r.output
    assert not out.with_name(f".{out.name}.lock").exists()


def test_a_lock_left_by_a_killed_process_is_taken_over(tmp_path):
    out = tmp_path / "run"
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock = out.with_name(f".{out.name}.lock")
    lock.write_text(json.dumps({"pid": int(gone.stdout), "host": socket.gethostname(), "since": "earlier"}))
    with run_lock(out):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert not lock.exists()


def _foreign_lock(out, job: str | None) -> None:
    """A lock written by a process on another node of a shared file system, in Slurm job ``job``."""
    lock = out.with_name(f".{out.name}.lock")
    lock.write_text(json.dumps({"pid": 1, "host": "another-node", "since": "earlier", "slurm_job": job}))


@pytest.mark.parametrize(("alive", "mine", "taken"), [
    (False, None, True),  # its Slurm job has ended (killed, node lost): stale
    (True, None, False),  # its job still runs: held
    (None, None, False),  # squeue did not answer: cannot tell, so held
    (True, "77", True),  # this very job, requeued onto another node: the lock is an earlier attempt's
])
def test_a_lock_from_another_node_is_taken_over_only_when_its_slurm_job_is_gone(monkeypatch, tmp_path, alive,
                                                                                mine, taken):
    import bench.runs

    monkeypatch.setattr(bench.runs, "job_alive", lambda job: alive)
    monkeypatch.setattr(bench.runs, "this_job", lambda: mine)
    out = tmp_path / "run"
    _foreign_lock(out, "77")
    if taken:
        with run_lock(out):
            assert json.loads(out.with_name(".run.lock").read_text())["pid"] == os.getpid()
    else:
        with pytest.raises(RunLockedError, match="process 1 on another-node"):
            with run_lock(out):
                pass


def test_a_lock_from_another_node_outside_slurm_is_held(tmp_path):
    out = tmp_path / "run"
    _foreign_lock(out, None)
    with pytest.raises(RunLockedError, match="if that process is gone, delete"):
        with run_lock(out):
            pass
