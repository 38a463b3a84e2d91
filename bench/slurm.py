"""What Slurm says of jobs, read with ``squeue`` (clusters without accounting storage have no ``sacct``).

One reader for the executor (:mod:`bench.cells`: has a job ended?) and the run-folder lock (:mod:`bench.runs`: is
the job that holds a lock still alive?). A failed ``squeue`` (a busy controller, a timeout) is ``None``, "cannot
tell", never "no jobs": a caller must not take a job for ended because the controller did not answer.
"""

from __future__ import annotations

import os
import subprocess

#: states of a job that has ended for good (PREEMPTED is not one: a pre-empted job may be requeued)
ENDED = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                   "DEADLINE", "SPECIAL_EXIT"})


def job_states(job_ids: list[str]) -> dict[str, str] | None:
    """Job id (array elements one by one) → state for ``job_ids``, as squeue lists them (ended jobs stay listed
    for the controller's MinJobAge); a job absent from the answer is no longer known. None: squeue failed."""
    if not job_ids:
        return {}
    try:
        out = subprocess.run(["squeue", "-h", "-r", "-t", "all", "-j", ",".join(job_ids), "-o", "%i|%T"],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        # every id unknown to the controller (ended longer ago than MinJobAge) is an error, not an empty list
        return {} if "invalid job id" in out.stderr.lower() else None
    return dict(line.split("|", 1) for line in out.stdout.split() if "|" in line)


def this_job() -> str | None:
    """The Slurm job this process runs in (an array element has its own id), None outside Slurm."""
    return os.environ.get("SLURM_JOB_ID")


def job_alive(job_id: str) -> bool | None:
    """Whether the job is queued or running (requeued included); None: squeue could not tell."""
    states = job_states([job_id])
    if states is None:
        return None
    state = states.get(job_id)
    return state is not None and state.split()[0] not in ENDED
