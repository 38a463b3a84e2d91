"""The local Slurm cluster of scripts/slurm-local.sh: sbatch runs a job, scancel kills one, submitit works on it.

The cluster has no accounting (``sacct`` fails), so job states come from ``scontrol show job``: slurmctld keeps
finished jobs for MinJobAge (an hour here).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from slurm_cluster import slurm_cluster  # noqa: F401

pytestmark = pytest.mark.usefixtures("slurm_cluster")

TIMEOUT_S = 60


def _run(*cmd: str) -> str:
    """Run a Slurm client command; its stdout, or a test failure with its stderr."""
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}")
    return proc.stdout


def _sbatch(*args: str) -> str:
    """Submit with sbatch; the job id."""
    return _run("sbatch", "--parsable", *args).strip().split(";")[0]


def _job_state(job_id: str) -> str:
    """The job's state as slurmctld reports it (PENDING, RUNNING, COMPLETED, CANCELLED, ...)."""
    fields = dict(f.split("=", 1) for f in _run("scontrol", "-o", "show", "job", job_id).split() if "=" in f)
    return fields["JobState"]


def _wait_for(check: Callable[[], bool], what: str, timeout: float = TIMEOUT_S) -> None:
    """Poll ``check`` until true; a test failure naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"not {what} after {timeout} s\n{_run('squeue', '-t', 'all')}")
        time.sleep(0.2)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_sbatch_runs_a_job_and_writes_its_output(tmp_path: Path) -> None:
    out = tmp_path / "out.txt"
    # --wait: sbatch returns when the job ends, with its exit code
    job_id = _sbatch("--wait", f"--chdir={tmp_path}", f"--output={out}",
                     "--wrap", 'echo "job $SLURM_JOB_ID in $SLURM_JOB_PARTITION as $(id -u)"')
    assert out.read_text() == f"job {job_id} in debug as {os.getuid()}\n"
    assert _job_state(job_id) == "COMPLETED"


def test_scancel_cancels_a_running_job_and_kills_its_process(tmp_path: Path) -> None:
    out = tmp_path / "out.txt"
    # the batch shell prints its pid, then becomes the sleep
    job_id = _sbatch(f"--chdir={tmp_path}", f"--output={out}", "--wrap", "echo $$; exec sleep 300")
    _wait_for(lambda: _job_state(job_id) == "RUNNING" and out.exists() and out.read_text().strip().isdigit(),
              f"running (job {job_id})")
    pid = int(out.read_text())
    assert _pid_alive(pid)
    _run("scancel", job_id)
    _wait_for(lambda: _job_state(job_id) == "CANCELLED", f"cancelled (job {job_id})")
    _wait_for(lambda: not _pid_alive(pid), f"killed (pid {pid} of job {job_id})")


# submitit pickles these with cloudpickle; the executor fixture makes it pickle them by value, since the job's
# Python cannot import this test module (tests/ is not on its sys.path)
def answer() -> int:
    return 6 * 7


def square(x: int) -> int:
    return x * x


def fail() -> None:
    raise ValueError("boom in the job")


@pytest.fixture()
def executor(tmp_path: Path) -> Iterator[Any]:
    """A submitit executor on the local cluster (no GPUs, memory not a consumable resource)."""
    import cloudpickle
    import submitit

    module = sys.modules[__name__]
    cloudpickle.register_pickle_by_value(module)
    ex = submitit.AutoExecutor(folder=tmp_path / "logs", cluster="slurm")
    ex.update_parameters(slurm_partition="debug", timeout_min=5, cpus_per_task=1, mem_gb=1)
    try:
        yield ex
    finally:
        cloudpickle.unregister_pickle_by_value(module)


def _result(job: Any) -> Any:
    """``job.result()`` with a bound: without sacct, submitit waits for ever for a job that died without a result."""
    deadline = time.monotonic() + TIMEOUT_S
    while not job.done():
        if time.monotonic() > deadline:
            job.cancel(check=False)
            pytest.fail(f"submitit job {job.job_id} not done after {TIMEOUT_S} s\n"
                        f"{_run('squeue', '-t', 'all')}\nstdout:\n{job.stdout()}\nstderr:\n{job.stderr()}")
        time.sleep(0.2)
    return job.result()


def test_submitit_runs_a_function_and_reports_its_exception(executor: Any) -> None:
    from submitit.core.utils import FailedJobError

    ok, bad = executor.submit(answer), executor.submit(fail)
    assert _result(ok) == 42
    with pytest.raises(FailedJobError, match="boom in the job"):
        _result(bad)
    # the result file appears before the job ends: its state turns COMPLETED a moment later
    _wait_for(lambda: _job_state(ok.job_id) == "COMPLETED", f"completed (job {ok.job_id})")
    _wait_for(lambda: _job_state(bad.job_id) == "FAILED", f"failed (job {bad.job_id})")


def test_submitit_job_array(executor: Any) -> None:
    jobs = executor.map_array(square, [1, 2, 3])
    assert len({job.job_id.split("_")[0] for job in jobs}) == 1  # one array job with three tasks
    assert [_result(job) for job in jobs] == [1, 4, 9]
