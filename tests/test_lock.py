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
