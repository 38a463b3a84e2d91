"""Cells and executors: how sweeps and the Table 1 reproduction run their runs, here or on a cluster.

A **cell** is one run: a :class:`~bench.runner.RunConfig` and the run folder it writes. Its key is the content hash
of its identity (:func:`bench.runner.run_key`: the fields that change a number, the method's options with their
defaults filled in, the recipe version), recorded as ``key`` in the folder's ``run_config.json``; whether a folder
holds the cell's run is the one same-run rule (:func:`bench.runner.same_identity`). An executor runs a list of cells and returns their results in order:

* ``inline``: one after another in this process (no job machinery);
* ``local``: submitit's local executor, worker processes on this machine (``--max-parallel`` at a time);
* ``slurm``: submitit on a Slurm cluster (partition, account, GPUs, CPUs, memory, time from
  :class:`ExecutorConfig`, from flags or a TOML/JSON file).

Cells already finished (a ``results.json`` that loads, of the same run, with no part missing) are skipped; the
others are grouped per model into about ``max_parallel`` jobs (at least one per model), so that a job loads its
model once for consecutive cells of one model. A killed job (``kill -9``, ``scancel``, a node failure) loses at most the part in progress: the next
attempt resumes every cell (:func:`bench.runner.run` with ``resume``); failed jobs are resubmitted up to
``retries`` times; on a Slurm time limit or pre-emption the job requeues itself (submitit checkpointing). A cell
that still fails is reported with its log and the others go on; Ctrl-C cancels the jobs this call submitted.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from bench.runs import RunFolder
from bench.slurm import ENDED, job_states

EXECUTORS = ("inline", "local", "slurm")


@dataclass
class ExecutorConfig:
    """Where and how cells run. Slurm fields map to sbatch options (``extra``: any other, e.g. ``{"qos": "high"}``)."""

    kind: str = "inline"
    max_parallel: int = 1  # jobs at a time (local: worker processes; slurm: the array's parallelism)
    retries: int = 1  # resubmissions of a job whose cells did not all finish
    logs: Path | None = None  # submitit's job folder [<output>/.jobs]
    poll_s: float = 2.0
    partition: str | None = None
    account: str | None = None
    gpus_per_job: int = 0
    cpus_per_job: int = 2
    mem_gb: float | None = None
    time_min: int = 240
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        problems = []
        if self.kind not in EXECUTORS:
            problems.append(f"unknown executor {self.kind!r}; valid: {', '.join(EXECUTORS)}")
        for name, low in (("max_parallel", 1), ("retries", 0), ("gpus_per_job", 0), ("cpus_per_job", 1),
                          ("time_min", 1)):
            if getattr(self, name) < low:
                problems.append(f"--{name.replace('_', '-')} must be ≥ {low}, got {getattr(self, name)}")
        if self.mem_gb is not None and not self.mem_gb > 0:
            problems.append(f"--mem-gb must be > 0, got {self.mem_gb}")
        if problems:
            raise ValueError("; ".join(problems))

    @classmethod
    def from_file(cls, path: str | Path, **overrides) -> ExecutorConfig:
        """Settings from a TOML or JSON file (its keys are this class's fields), then ``overrides`` (not None)."""
        import tomllib

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no executor settings file at {path}")
        text = path.read_text()
        try:
            data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
        except (json.JSONDecodeError, tomllib.TOMLDecodeError) as err:
            raise ValueError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'TOML'} ({err})") from None
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{path}: unknown executor setting(s) {unknown}; valid: {', '.join(sorted(known))}")
        return cls(**{**data, **{k: v for k, v in overrides.items() if v is not None}})


def executor_config(kind: str = "inline", max_parallel: int | None = None, config_file: str | Path | None = None,
                    assignments: list[str] | None = None) -> ExecutorConfig:
    """The executor of ``--executor``, ``--max-parallel``, ``--executor-config FILE`` and ``-X KEY=VALUE`` items
    (later ones win; a key that is no field of :class:`ExecutorConfig` is passed to sbatch, e.g. ``-X qos=high``)."""
    from bench.options import parse_assignments

    cfg = ExecutorConfig.from_file(config_file) if config_file else ExecutorConfig()
    known = {f.name: f for f in fields(ExecutorConfig)}
    changes: dict = {"kind": kind} if kind != "inline" or not config_file else {}
    if max_parallel is not None:
        changes["max_parallel"] = max_parallel
    extra = dict(cfg.extra)
    for key, raw in parse_assignments(assignments or [], "-X").items():
        if key in known and key != "extra":
            changes[key] = _typed(raw, str(known[key].type), key)
        else:
            extra[key.replace("_", "-")] = raw
    return replace(cfg, **changes, extra=extra)


def _typed(raw: str, kind: str, key: str) -> object:
    """``raw`` as the field's type (``int``, ``float``, ``str``, optionally ``| None``)."""
    if raw.lower() in ("none", "") and "None" in kind:
        return None
    try:
        if kind.startswith("int"):
            return int(raw)
        if kind.startswith("float"):
            return float(raw)
    except ValueError:
        raise ValueError(f"-X {key}={raw}: not a number ({kind.split(' ')[0]})") from None
    return raw


@dataclass(frozen=True)
class Cell:
    """One run of a sweep or reproduction: its configuration and the folder it writes."""

    cfg: object  # bench.runner.RunConfig
    out: Path

    @property
    def key(self) -> str:
        """The content hash of the run's identity (``key`` in the folder's ``run_config.json``)."""
        from bench.runner import run_key

        return run_key(self.cfg)


class CellsFailed(RuntimeError):
    """Some cells did not finish; the others did (their results are on disk)."""


def finished(cell: Cell) -> dict | None:
    """The cell's results when its folder holds this run, finished with every part; None when it must run.
    A folder holding another run is refused (as ``bench run`` refuses it)."""
    from bench.sweep import reusable

    return reusable(cell.cfg, cell.out)


def execute(cells: list[Cell], executor: ExecutorConfig | None = None, data_dir: str | None = None,
            echo: Callable[[str], None] = print) -> list[dict]:
    """Run every cell not finished yet with ``executor``; returns each cell's results, in order."""
    from bench.sweep import run_point

    executor = executor or ExecutorConfig()
    if executor.kind == "inline":
        results = []
        for i, c in enumerate(cells, 1):
            echo(f"[cells] {i}/{len(cells)}: {c.out.name}")
            results.append(run_point(c.cfg, c.out, data_dir, echo))
        return results
    done: dict[int, dict] = {}

    def pending() -> list[Cell]:
        """The cells not finished yet (each finished one's results read once, into ``done``)."""
        done.update({i: res for i, c in enumerate(cells) if i not in done and (res := finished(c)) is not None})
        return [c for i, c in enumerate(cells) if i not in done]

    todo = pending()
    echo(f"[cells] {len(cells)} cells: {len(done)} finished, {len(todo)} to run on the {executor.kind} executor")
    failed: dict[Path, str] = {}
    for attempt in range(executor.retries + 1):
        if not todo:
            break
        if attempt:
            echo(f"[cells] retry {attempt}/{executor.retries}: {len(todo)} cells")
        failed = _submit_and_wait(todo, executor, data_dir, echo)
        todo = pending()
    if todo:
        lines = [f"  - {c.out}: {failed.get(c.out, 'did not finish')} (log: {RunFolder(c.out).log})" for c in todo]
        raise CellsFailed(f"{len(todo)} of {len(cells)} cells failed; the others finished. Rerun the same command "
                          "to finish only these:\n" + "\n".join(lines))
    return [done[i] for i in range(len(cells))]


def groups(cells: list[Cell], max_parallel: int) -> list[list[Cell]]:
    """Cells per job: a job never mixes models (it loads its model once); each model's cells are split into
    ``max_parallel // models`` consecutive chunks (at least one), so that the jobs fill ``max_parallel`` slots."""
    by_model: dict[str, list[Cell]] = {}
    for c in cells:
        by_model.setdefault(c.cfg.model, []).append(c)
    share = max(1, max_parallel // max(1, len(by_model)))
    out = []
    for model_cells in by_model.values():
        size = math.ceil(len(model_cells) / min(share, len(model_cells)))
        out += [model_cells[i:i + size] for i in range(0, len(model_cells), size)]
    return out


def _executor(cfg: ExecutorConfig, folder: Path):
    import submitit

    if cfg.kind == "local":
        ex = submitit.LocalExecutor(folder=folder)
        ex.update_parameters(timeout_min=cfg.time_min)
        return ex
    ex = submitit.SlurmExecutor(folder=folder)
    params = {"time": cfg.time_min, "cpus_per_task": cfg.cpus_per_job, "array_parallelism": cfg.max_parallel,
              "partition": cfg.partition, "account": cfg.account, "gpus_per_node": cfg.gpus_per_job or None,
              "mem": f"{int(cfg.mem_gb * 1024)}M" if cfg.mem_gb else None,
              "additional_parameters": dict(cfg.extra) or None}
    ex.update_parameters(**{k: v for k, v in params.items() if v is not None})
    return ex


def _submit_and_wait(cells: list[Cell], cfg: ExecutorConfig, data_dir: str | None,
                     echo: Callable[[str], None]) -> dict[Path, str]:
    """Submit the cells' jobs, show their progress until every job ends; returns the failed cells' errors."""
    folder = Path(cfg.logs or cells[0].out.parent / ".jobs")
    ex = _executor(cfg, folder)
    batches = groups(cells, cfg.max_parallel)
    # Slurm: one job array, its parallelism bounded by Slurm; local: waves of max_parallel worker processes
    waves = [batches] if cfg.kind == "slurm" else [batches[i:i + cfg.max_parallel]
                                                   for i in range(0, len(batches), cfg.max_parallel)]
    failed: dict[Path, str] = {}
    for wave in waves:
        jobs = []
        try:
            with ex.batch() if cfg.kind == "slurm" else nullcontext():
                jobs = [ex.submit(CellJob(), [_payload(c) for c in b], data_dir) for b in wave]
            echo(f"[cells] submitted {len(jobs)} job(s) for {sum(map(len, wave))} cells; job logs in {folder}")
            _watch(jobs, wave, cfg.poll_s, echo, slurm=cfg.kind == "slurm")
        except KeyboardInterrupt:
            for job in jobs:
                job.cancel(check=False)
            echo(f"[cells] interrupted: cancelled {len(jobs)} job(s); rerun the same command to resume")
            raise
        states = _states(jobs, cfg.kind == "slurm")
        for job, batch in zip(jobs, wave):
            job_error, errors = _outcome(job, states)
            for c in batch:
                if finished(c) is None:
                    failed[c.out] = errors.get(str(c.out)) or (f"{job_error or 'did not finish'} (job {job.job_id}: "
                                                               f"{job.paths.stderr})")
    return failed


#: how long the executor waits on a Slurm controller that does not answer squeue before it gives up (the jobs are
#: left to run; the same command, run again, collects what they finished)
SQUEUE_PATIENCE_S = 600.0


def _states(jobs: list, slurm: bool) -> dict[str, str] | None:
    """The jobs' Slurm states (None: not Slurm, or squeue did not answer)."""
    return job_states([str(job.job_id) for job in jobs]) if slurm else None


def _ended(job, states: dict[str, str] | None, slurm: bool) -> bool:
    """Whether the job has ended: its result (or error) is written, or (local) its process is gone, or (Slurm) its
    state is final or squeue no longer lists it. A Slurm job whose state could not be read has not ended."""
    if job.paths.result_pickle.exists():
        return True
    if not slurm:
        return job.done()
    if states is None:
        return False
    state = states.get(str(job.job_id))
    return state is None or state.split()[0] in ENDED


def _outcome(job, states: dict[str, str] | None) -> tuple[str | None, dict[str, str | None]]:
    """What an ended job says: why it failed as a whole (None: it returned) and its cells' errors. Never waits:
    a job that ended without a result (killed) is read as such."""
    if not job.paths.result_pickle.exists():
        state = (states or {}).get(str(job.job_id), "killed, or no longer listed")
        return f"the job ended ({state}) without a result", {}
    try:
        return None, job.result()
    except Exception as err:  # noqa: BLE001 - a job's failure is reported per cell, the others go on
        return _reason(str(err)), {}


def _reason(text: str) -> str:
    """The exception line of a failed job's trace (submitit's message ends with separators and log paths)."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    ends = [i for i, line in enumerate(lines) if set(line) == {"-"}]
    line = lines[ends[-1] - 1] if len(ends) >= 2 else (lines[0] if lines else "")
    return line[:300] or "failed"


def _payload(cell: Cell) -> dict:
    return {"cfg": asdict(cell.cfg), "out": str(cell.out)}


def _cell_state(cell: Cell) -> str:
    folder = RunFolder(cell.out)
    if folder.finished():
        return "done"
    return "running" if folder.config.exists() else "queued"


def _watch(jobs: list, batches: list[list[Cell]], poll_s: float, echo: Callable[[str], None],
           slurm: bool = False) -> None:
    """A live table of the cells (queued / running / done / failed) with an ETA, until every job has ended."""
    from rich.live import Live
    from rich.table import Table

    start, total = time.monotonic(), sum(len(b) for b in batches)

    answered = time.monotonic()

    def ended() -> list[bool]:
        nonlocal answered
        states = _states(jobs, slurm)
        if states is not None or not slurm:
            answered = time.monotonic()
        elif time.monotonic() - answered > SQUEUE_PATIENCE_S:
            raise RuntimeError(f"squeue has not answered for {SQUEUE_PATIENCE_S / 60:.0f} min; jobs "
                               f"{', '.join(str(j.job_id) for j in jobs)} are left as they are. Run the same command "
                               "again once the Slurm controller answers: it collects what they finished")
        return [_ended(job, states, slurm) for job in jobs]

    def table() -> Table:
        states = {}
        for batch, job_ended in zip(batches, ended()):
            for c in batch:
                s = _cell_state(c)
                states[c.out] = "failed" if job_ended and s != "done" else s
        done = sum(s == "done" for s in states.values())
        elapsed = time.monotonic() - start
        eta = f"{elapsed / done * (total - done) / 60:.1f} min" if done else "–"
        t = Table(title=f"cells: {done}/{total} done, ETA {eta}")
        for col in ("cell", "state", "job"):
            t.add_column(col)
        for job, batch in zip(jobs, batches):
            for c in batch:
                t.add_row(c.out.name, states[c.out], str(job.job_id))
        return t

    with Live(table(), refresh_per_second=1, transient=True) as live:
        while not all(ended()):
            time.sleep(poll_s)
            live.update(table())
    echo(f"[cells] all jobs ended after {(time.monotonic() - start) / 60:.1f} min")


class CellJob:
    """A job's work: its cells in order, each resumed from its folder (so a retried or requeued job finishes
    only what is missing), each logged to ``<run folder>/cell.log``. On a Slurm time limit or pre-emption
    submitit calls :meth:`checkpoint`, which requeues the same job."""

    def __call__(self, cells: list[dict], data_dir: str | None) -> dict[str, str | None]:
        """Each cell's run folder → its error (None: finished); one failing cell does not stop the others."""
        from bench.models import shared_models

        with shared_models():  # the job's model is loaded once for all its cells
            return {payload["out"]: _run_cell(payload, data_dir) for payload in cells}

    def checkpoint(self, cells: list[dict], data_dir: str | None):
        import submitit

        return submitit.helpers.DelayedSubmission(self, cells, data_dir)


def _run_cell(payload: dict, data_dir: str | None) -> str | None:
    """One cell inside a job, logged to its ``cell.log``; returns its error (None: finished)."""
    from bench.runner import RunConfig
    from bench.sweep import run_point

    out = Path(payload["out"])
    out.mkdir(parents=True, exist_ok=True)
    with RunFolder(out).log.open("a") as log:
        def echo(msg: str) -> None:
            print(msg, flush=True)
            log.write(msg + "\n")
            log.flush()

        echo(f"[cell] {out} ({time.strftime('%Y-%m-%d %H:%M:%S')})")
        try:
            run_point(RunConfig(**payload["cfg"]), out, data_dir, echo)
        except Exception as err:  # noqa: BLE001 - one failing cell must not stop the job's others
            if type(err).__name__ == "UncompletedJobError":  # submitit: requeued too often; the job must end
                raise
            echo(f"[cell failed] {type(err).__name__}: {err}")
            return f"{type(err).__name__}: {err}"
    return None
