"""Cells and executors (issue 22): a sweep run by submitit's local executor (2 workers) or on a real single-node
Slurm cluster gives exactly the inline sweep's numbers; finished cells are skipped; a killed job resumes without
fitting twice; a failing cell is reported with its log while the others finish."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from bench.cells import (
    Cell,
    CellJob,
    CellsFailed,
    ExecutorConfig,
    _executor,
    _payload,
    execute,
    executor_config,
    groups,
)
from bench.runner import RunConfig
from bench.runs import RunFolder
from bench.slurm import job_alive
from bench.sweep import run_sweep
from slurm_cluster import slurm_cluster  # noqa: F401 - the fixture, started on first use

KINDS = ("local", "slurm")


def _executor_for(kind: str, request: pytest.FixtureRequest, tmp_path: Path, **changes) -> ExecutorConfig:
    if kind == "slurm":
        request.getfixturevalue("slurm_cluster")  # a real cluster on localhost (fails loudly when it cannot start)
        changes = {"cpus_per_job": 1, "time_min": 10, **changes}
    return ExecutorConfig(kind=kind, max_parallel=2, logs=tmp_path / "jobs", poll_s=0.5, **changes)


def _base(tiny_dir: Path, **changes) -> RunConfig:
    return RunConfig(**{"method": "mean-shift", "model": str(tiny_dir), "task": "truthfulqa-mc", "layer": 1,
                        "limit": 12, "compile": False, **changes})


def _fits(folder: Path) -> dict[str, float]:
    """Every fit file under ``folder`` and its modification time (a fit computed again rewrites its file)."""
    return {str(p.relative_to(folder)): p.stat().st_mtime for p in folder.rglob("fold_*.fit.json")}


@pytest.mark.parametrize("kind", KINDS)
def test_an_executor_sweep_equals_the_inline_sweep_and_skips_finished_cells(kind, request, tiny_dir, tqa_dir,
                                                                            tmp_path):
    base = _base(tiny_dir)
    logs: list[str] = []
    inline = run_sweep(base, "scale", "0.5,2,8", tmp_path / "inline", "mc2", str(tqa_dir), echo=logs.append)
    executor = _executor_for(kind, request, tmp_path)
    spread = run_sweep(base, "scale", "0.5,2,8", tmp_path / kind, "mc2", str(tqa_dir), echo=logs.append,
                       executor=executor)
    assert spread["chosen"] == inline["chosen"]
    assert [p["metrics"] for p in spread["points"]] == [p["metrics"] for p in inline["points"]]
    assert spread["baseline"]["metrics"] == inline["baseline"]["metrics"]
    assert spread["final"]["metrics"] == inline["final"]["metrics"]
    assert any(f"to run on the {kind} executor" in line for line in logs)
    before, logs = _fits(tmp_path / kind), []
    again = run_sweep(base, "scale", "0.5,2,8", tmp_path / kind, "mc2", str(tqa_dir), echo=logs.append,
                      executor=executor)
    assert again["chosen"] == spread["chosen"] and _fits(tmp_path / kind) == before  # nothing fitted again
    counts = [line for line in logs if "cells:" in line]  # the grid with its baseline, then the test runs
    assert counts[0] == f"[cells] 4 cells: 4 finished, 0 to run on the {kind} executor"
    assert len(counts) == 2 and counts[1].endswith(f", 0 to run on the {kind} executor")
    assert (tmp_path / kind / "scale=2" / "cell.log").is_file()


def _kill_slurm_job(job_id: str) -> None:
    """SIGKILL to every process of a Slurm job (``scontrol listpids``; this cluster runs on this machine)."""
    listed = subprocess.run(["scontrol", "listpids", job_id], capture_output=True, text=True, check=True).stdout
    pids = [int(line.split()[0]) for line in listed.splitlines()[1:] if line.split() and line.split()[0].isdigit()]
    assert pids, listed
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _kill_tree(pid: int) -> None:
    """SIGKILL to ``pid`` and its descendants, children first (none of them gets to finish the run)."""
    listed = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    for child in listed.split():
        _kill_tree(int(child))
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.mark.parametrize("kind", KINDS)
def test_a_killed_job_resumes_without_fitting_twice(kind, request, tiny_dir, tqa_dir, tmp_path):
    cfg = _base(tiny_dir, method="florain", options={"epochs": 400, "rank": 2})
    cell = Cell(cfg, tmp_path / "run")
    executor = _executor_for(kind, request, tmp_path)
    job = _executor(executor, tmp_path / "jobs").submit(CellJob(), [_payload(cell)], str(tqa_dir))
    deadline = time.monotonic() + 300
    while not (cell.out / "fold_0.fit.json").exists():  # killed once fold 0's fit is saved, before the run ends
        assert time.monotonic() < deadline and not job.done(), job.done() and job.stderr()
        time.sleep(0.05)
    if kind == "slurm":  # kill -9 of every process of the job, as a node failure would
        _kill_slurm_job(str(job.job_id))
        while job_alive(str(job.job_id)) is not False:
            time.sleep(0.2)
    else:  # the same kill -9 to the local job's processes: submitit's controller and the task it started
        _kill_tree(job._process.pid)
        while not job.done():
            time.sleep(0.2)
    assert not RunFolder(cell.out).finished(), "the job finished before it was killed: make the cell longer"
    fitted = _fits(cell.out)
    (res,) = execute([cell], executor, str(tqa_dir), echo=lambda m: None)
    assert _fits(cell.out)["fold_0.fit.json"] == fitted["fold_0.fit.json"]  # fold 0's fit reused, not recomputed
    # fold 0 reused: its fit, or the whole fold when the kill landed after its evaluation (a fast machine)
    assert {"fold_0.fit.json", "fold_0.json"} & set(res["timings"]["reused"]), RunFolder(cell.out).log.read_text()
    (fresh,) = execute([Cell(cfg, tmp_path / "inline")], None, str(tqa_dir), echo=lambda m: None)
    assert res["metrics"] == fresh["metrics"]  # the resumed run is the uninterrupted run


@pytest.mark.parametrize("kind", KINDS)
def test_a_failing_cell_is_reported_with_its_log_and_the_others_finish(kind, request, tiny_dir, tqa_dir, tmp_path):
    good, bad = Cell(_base(tiny_dir), tmp_path / "good"), Cell(_base(tiny_dir, layer=99), tmp_path / "bad")
    executor = _executor_for(kind, request, tmp_path, retries=1)
    with pytest.raises(CellsFailed) as err:
        execute([bad, good], executor, str(tqa_dir), echo=lambda m: None)
    text = str(err.value)
    assert "1 of 2 cells failed" in text and str(bad.out) in text and str(bad.out / "cell.log") in text
    (line,) = [line for line in text.splitlines() if str(bad.out) in line]
    assert "layer 99" in line, text  # the failed cell's own reason, not its job's log paths
    log = (bad.out / "cell.log").read_text()
    assert log.count("[cell] ") == 2 and log.count("layer 99") >= 2, log  # the first attempt and the retry
    assert RunFolder(good.out).finished() and not RunFolder(bad.out).finished()


def test_executor_settings_come_from_flags_a_file_and_key_values(tmp_path):
    file = tmp_path / "slurm.toml"
    file.write_text('kind = "slurm"\npartition = "gpu"\ngpus_per_job = 1\nmem_gb = 64\n[extra]\nconstraint = "a100"\n')
    cfg = executor_config("inline", 4, file, ["time_min=90", "qos=high", "account=lab", "mem_gb=none"])
    assert (cfg.kind, cfg.partition, cfg.gpus_per_job, cfg.max_parallel, cfg.time_min, cfg.account) == (
        "slurm", "gpu", 1, 4, 90, "lab")
    assert cfg.mem_gb is None and cfg.extra == {"constraint": "a100", "qos": "high"}
    with pytest.raises(ValueError, match="unknown executor 'ray'; valid: inline, local, slurm"):
        executor_config("ray")
    with pytest.raises(ValueError, match="--max-parallel must be ≥ 1, got 0"):
        executor_config("local", 0)
    with pytest.raises(ValueError, match="-X time_min=soon: not a number"):
        executor_config("slurm", None, None, ["time_min=soon"])
    bad = tmp_path / "bad.toml"
    bad.write_text("partitoin = 'gpu'\n")
    with pytest.raises(ValueError, match="unknown executor setting.*partitoin"):
        executor_config("slurm", None, bad)


def test_cells_are_grouped_per_model_into_at_most_max_parallel_jobs(tmp_path):
    cells = [Cell(RunConfig(model=m, method="none"), tmp_path / f"{m}-{i}") for m in ("a", "b") for i in range(5)]
    jobs = groups(cells, 4)
    assert [[c.out.name for c in job] for job in jobs] == [["a-0", "a-1", "a-2"], ["a-3", "a-4"],
                                                           ["b-0", "b-1", "b-2"], ["b-3", "b-4"]]
    assert groups(cells, 1) == [cells[:5], cells[5:]]  # a job never mixes models
    assert json.dumps([c.key for c in cells[:2]]) and cells[0].key == cells[1].key  # the same run, two folders


def _preempt(kind: str, jobs_dir: Path) -> None:
    """The signal a Slurm time limit or pre-emption sends (USR2, submitit's ``--signal=USR2@90``) to the one job
    in ``jobs_dir``'s task: submitit asks :meth:`CellJob.checkpoint` for the rest of the work and requeues it."""
    (submitted,) = jobs_dir.glob("*_submitted.pkl")
    job_id = submitted.name.removesuffix("_submitted.pkl")
    if kind == "slurm":
        subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
        _start_requeued_now(job_id)
        return
    tasks = subprocess.run(["pgrep", "-P", job_id], capture_output=True, text=True).stdout.split()
    assert tasks, f"the local job {job_id} has no task process"
    for pid in tasks:  # the local controller starts again a task that exits with submitit's requeue code
        os.kill(int(pid), signal.SIGUSR2)


def _start_requeued_now(job_id: str) -> None:
    """Slurm makes a requeued job wait for its begin time (about 2 minutes here); the test moves that to now
    once the job is pending again, as an administrator could, to keep CI short."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        listed = subprocess.run(["squeue", "-h", "-r", "-j", job_id, "-o", "%T|%r"], capture_output=True,
                                text=True).stdout.split()
        if listed and listed[0].startswith("PENDING"):
            subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=True)
            return
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} was not requeued within 2 minutes of USR2: squeue says {listed}")


@pytest.mark.parametrize("kind", KINDS)
def test_a_preempted_job_requeues_itself_and_finishes_without_fitting_twice(kind, request, tiny_dir, tqa_dir,
                                                                             tmp_path):
    cfg = _base(tiny_dir, method="florain", options={"epochs": 400, "rank": 2})
    cell = Cell(cfg, tmp_path / "run")
    executor = _executor_for(kind, request, tmp_path)
    done: list = []
    worker = threading.Thread(target=lambda: done.append(execute([cell], executor, str(tqa_dir), echo=print)))
    worker.start()
    deadline = time.monotonic() + 300
    while not (cell.out / "fold_0.fit.json").exists():
        assert time.monotonic() < deadline and worker.is_alive(), "the job ended before fold 0 was fitted"
        time.sleep(0.05)
    fitted = _fits(cell.out)
    _preempt(kind, executor.logs)
    worker.join(timeout=300)
    log = RunFolder(cell.out).log.read_text()
    assert done, log  # the executor waited through the requeue and returned the cell's results
    assert log.count("[cell] ") == 2, log  # the same job started twice: the requeued attempt continued the first
    assert _fits(cell.out)["fold_0.fit.json"] == fitted["fold_0.fit.json"], log
    ((res,),) = done
    assert {"fold_0.fit.json", "fold_0.json"} & set(res["timings"]["reused"]), log  # its fit, or the whole fold
    (fresh,) = execute([Cell(cfg, tmp_path / "inline")], None, str(tqa_dir), echo=lambda m: None)
    assert res["metrics"] == fresh["metrics"]
