"""What squeue says, read without a cluster (a stand-in ``squeue`` on PATH): a controller that does not answer is
"cannot tell", never "every job ended"; ids the controller no longer knows are ended."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from bench.cells import _ended, _reason
from bench.slurm import job_alive, job_states


def _squeue(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, stdout: str, stderr: str = "", rc: int = 0) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    script = bin_dir / "squeue"
    script.write_text(f"#!/bin/sh\nprintf '%s' '{stdout}'\nprintf '%s' '{stderr}' >&2\nexit {rc}\n")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")


def _job(job_id: str, tmp_path: Path) -> SimpleNamespace:
    return SimpleNamespace(job_id=job_id, paths=SimpleNamespace(result_pickle=tmp_path / f"{job_id}_result.pkl"))


def test_states_are_read_per_array_element(monkeypatch, tmp_path):
    _squeue(monkeypatch, tmp_path, "12_0|RUNNING\n12_1|COMPLETED\n13|PENDING\n")
    assert job_states(["12_0", "12_1", "13"]) == {"12_0": "RUNNING", "12_1": "COMPLETED", "13": "PENDING"}
    assert [_ended(_job(j, tmp_path), job_states([j]), slurm=True) for j in ("12_0", "12_1", "13", "14")] == [
        False, True, False, True]  # 14: no longer listed
    assert job_alive("13") is True and job_alive("12_1") is False


def test_a_controller_that_does_not_answer_is_not_read_as_every_job_ended(monkeypatch, tmp_path):
    _squeue(monkeypatch, tmp_path, "", "slurm_load_jobs error: Socket timed out on send/recv operation", rc=1)
    assert job_states(["12_0"]) is None and job_alive("12_0") is None
    assert not _ended(_job("12_0", tmp_path), job_states(["12_0"]), slurm=True)
    (tmp_path / "12_0_result.pkl").write_bytes(b"")  # a written result ends a job whatever squeue says
    assert _ended(_job("12_0", tmp_path), None, slurm=True)


def test_ids_the_controller_no_longer_knows_have_ended(monkeypatch, tmp_path):
    _squeue(monkeypatch, tmp_path, "", "slurm_load_jobs error: Invalid job id specified", rc=1)
    assert job_states(["99"]) == {} and job_alive("99") is False


def test_a_failed_job_is_reported_by_its_exception_line_not_its_log_paths():
    text = ("Job (task=0) failed during processing with trace:\n----------------------\nTraceback (most recent "
            "call last):\n  File \"x.py\", line 1, in <module>\nValueError: layer 99 is out of range\n\n"
            "----------------------\nYou can check full logs with 'job.stderr(0)' and 'job.stdout(0)'or at paths:\n"
            "  - /jobs/1_0_log.err\n  - /jobs/1_0_log.out")
    assert _reason(text) == "ValueError: layer 99 is out of range"
    assert _reason("boom") == "boom"
