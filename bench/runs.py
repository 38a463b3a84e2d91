"""Run directories and the one results schema: config, environment, per-fold and mean metrics, timings.

Files are written atomically (temp file + rename), so an interrupted run never leaves a half-written
``results.json``. Completed folds are saved as they finish, so ``--resume`` continues a run.
"""

from __future__ import annotations

import datetime as _dt
import functools
import gzip
import hashlib
import json
import math
import os
import platform
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
from scipy import stats

from bench.paths import repo_root
from bench.slurm import job_alive, this_job

SCHEMA_VERSION = 1
PACKAGES = ("torch", "transformers", "numpy", "scipy", "scikit-learn", "safetensors", "florain-bench")


@dataclass(frozen=True)
class RunFolder:
    """Where each file of a run folder lives: the layout is named here and nowhere else.

    ``results.json`` (the one results schema; written last), ``results.md``, ``run_config.json`` (the identity a
    resume must match), ``per_question.jsonl.gz`` (every question's scores; gzip, as committed runs keep it), and
    per fold: ``fold_K.json`` (the finished fold), ``fold_K.PART.json`` (one part: mc, gen, klce, ...),
    ``generations_foldK.jsonl`` / ``judgements_foldK.jsonl`` / ``samples_foldK.jsonl`` (append-only progress),
    ``intervention_foldK/`` and ``lm_eval_foldK/``. The lock of a run folder lies beside it (:func:`run_lock`).
    """

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    @property
    def results(self) -> Path:
        return self.path / "results.json"

    @property
    def table(self) -> Path:
        return self.path / "results.md"

    @property
    def config(self) -> Path:
        return self.path / "run_config.json"

    @property
    def per_question(self) -> Path:
        return self.path / "per_question.jsonl.gz"

    @property
    def legacy_per_question(self) -> Path:
        """Where runs written before 2026-12-03 keep their per-question records (plain JSON lines)."""
        return self.path / "per_question.jsonl"

    def fold(self, k: int) -> Path:
        return self.path / f"fold_{k}.json"

    def part(self, k: int, part: str) -> Path:
        return self.path / f"fold_{k}.{part}.json"

    def generations(self, k: int) -> Path:
        return self.path / f"generations_fold{k}.jsonl"

    def judgements(self, k: int) -> Path:
        return self.path / f"judgements_fold{k}.jsonl"

    def intervention(self, k: int) -> Path:
        return self.path / f"intervention_fold{k}"

    def samples(self, k: int) -> Path:
        """Toxicity: every prompt's sampled continuations (append-only progress)."""
        return self.path / f"samples_fold{k}.jsonl"

    def lm_eval(self, k: int) -> Path:
        return self.path / f"lm_eval_fold{k}"

    @property
    def log(self) -> Path:
        """The log of the jobs that ran this folder as a cell (:mod:`bench.cells`; appended by every attempt)."""
        return self.path / "cell.log"

    def fitted(self, k: int) -> list[Path]:
        """What fold ``k``'s fit wrote: its layer choice, its fit record and its saved intervention."""
        return [self.part(k, "layer"), self.part(k, "fit"), self.intervention(k)]

    def evaluation(self, k: int) -> list[Path]:
        """Everything fold ``k``'s evaluation wrote (what a new fit of the fold makes stale)."""
        fixed = [self.fold(k), self.generations(k), self.judgements(k), self.samples(k), self.lm_eval(k)]
        return [*fixed, *(p for p in sorted(self.path.glob(f"fold_{k}.*.json")) if p not in self.fitted(k))]

    def finished(self) -> bool:
        return self.results.is_file()

    def read_results(self) -> dict:
        """The run's ``results.json``, checked (valid JSON, a results record, a format this version reads); a clear
        error when the folder holds no finished run."""
        if not self.results.is_file():
            raise FileNotFoundError(f"{self.path} holds no finished run (no results.json); finish it with "
                                    "`bench run ... --resume --output` on the same folder")
        return read_results_file(self.results)

    def read_per_question(self) -> list[dict]:
        """Every question's record (``per_question.jsonl.gz``, or the plain file of an earlier run)."""
        path = self.per_question if self.per_question.is_file() else self.legacy_per_question
        if not path.is_file():
            raise FileNotFoundError(f"no {self.per_question.name} in {self.path}: not a finished run folder")
        try:
            text = gzip.decompress(path.read_bytes()).decode() if path.suffix == ".gz" else path.read_text()
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        except (OSError, EOFError, UnicodeDecodeError, json.JSONDecodeError) as err:  # a torn gzip stream, a bad line
            raise ValueError(f"{path} cannot be read ({type(err).__name__}: {err}): the run folder is damaged"
                             ) from None

    def write_per_question(self, records: list[dict]) -> None:
        """Write the records atomically as reproducible gzip (no timestamp: the same records, the same bytes) and
        drop a plain file an earlier version wrote."""
        data = "".join(json.dumps(r) + "\n" for r in records).encode()
        write_bytes(self.per_question, gzip.compress(data, compresslevel=9, mtime=0))
        self.legacy_per_question.unlink(missing_ok=True)


def read_json(path: Path | str, what: str = "JSON file") -> object:
    """A JSON file's content; a damaged file is refused naming it (not a bare decoder message)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err.msg}, line {err.lineno}): a damaged {what}") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start}): a damaged {what}") from None


def read_results_file(path: Path | str) -> dict:
    """A ``results.json``: valid JSON, a results record (config and metrics), a format this version reads."""
    res = read_json(path, "results file")
    if not isinstance(res, dict) or "config" not in res or "metrics" not in res:
        raise ValueError(f"{path} is not a bench results file (no config/metrics)")
    check_format(path, res.get("schema_version"), SCHEMA_VERSION, "results")
    return res


def check_format(path: Path | str, found: object, supported: int, what: str) -> None:
    """Refuse a file written in a newer format than this code reads (``found``: its recorded version; a file
    without one is version 1)."""
    version = 1 if found is None else found
    if not isinstance(version, int) or version > supported:
        raise ValueError(f"{path}: {what} format version {found!r}, but this bench reads versions up to "
                         f"{supported}: upgrade florain-bench to read it")


class RunLockedError(RuntimeError):
    """Another live process is writing the run folder."""


@contextmanager
def run_lock(out: Path) -> Iterator[None]:
    """One writer per run folder: a lock file beside it (``.<name>.lock``, created atomically, holding the PID,
    host and Slurm job). A second writer is refused naming the holder; a lock whose process is gone (killed) is
    taken over: on this host, a process that no longer exists; on another host, a Slurm job that has ended or an
    earlier attempt of this very job (requeued after a node failure)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    lock = out.with_name(f".{out.name}.lock")
    me = {"pid": os.getpid(), "host": socket.gethostname(), "since": now_iso(), "slurm_job": this_job()}
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            holder = _lock_holder(lock)
            if holder is not None:
                raise RunLockedError(f"{out} is being written by process {holder.get('pid')} on "
                                     f"{holder.get('host')} (since {holder.get('since')}); wait for it to finish or "
                                     f"choose another --output (if that process is gone, delete {lock})") from None
            lock.unlink(missing_ok=True)  # stale: its process is gone
            continue
        with os.fdopen(fd, "w") as fh:
            json.dump(me, fh)
        break
    else:
        raise RunLockedError(f"cannot lock {out}: {lock} keeps reappearing; another process is starting there")
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def _lock_holder(lock: Path) -> dict | None:
    """The lock's holder while its process lives on this host (None: stale, or unreadable)."""
    try:
        holder = json.loads(lock.read_text())
        pid = int(holder["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        try:  # empty or torn: a writer that is just starting holds it; one killed mid-write long ago does not
            fresh = _dt.datetime.now().timestamp() - lock.stat().st_mtime < 10
        except OSError:
            return None
        return {"pid": "?", "host": "?", "since": "just now"} if fresh else None
    job = holder.get("slurm_job")
    if holder.get("host") != socket.gethostname():
        if job and job == this_job():
            return None  # an earlier attempt of the job this process runs in, on a node it left (requeued)
        # another machine's process (shared file system): stale once its Slurm job has ended; else cannot tell
        return None if job and job_alive(job) is False else holder
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return holder
    return holder


def write_json(path: Path, obj: object, indent: int | None = 2) -> None:
    """Atomically write ``obj`` as JSON (temp file + rename)."""
    write_bytes(path, (json.dumps(obj, indent=indent, default=str) + "\n").encode())


def write_bytes(path: Path, data: bytes) -> None:
    """Atomically write a file (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path: Path, text: str) -> None:
    """Atomically write a text file (temp file + rename)."""
    write_bytes(path, text.encode())


def read_progress(path: Path) -> list[dict]:
    """Records of an append-only progress file (JSON lines). A torn tail left by a killed run is cut off the
    file, so that records appended after a resume start on a line of their own."""
    path = Path(path)
    if not path.exists():
        return []
    out, valid = [], 0
    with path.open("rb") as fh:
        for line in fh:
            if not line.endswith(b"\n"):
                break
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                break
            valid += len(line)
    if valid < path.stat().st_size:
        os.truncate(path, valid)
    return out


def append_progress(path: Path, records: list[dict]) -> None:
    """Append records to a progress file and flush them to the OS."""
    with Path(path).open("a") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in records)
        fh.flush()


@contextmanager
def atomic_directory(target: Path) -> Iterator[Path]:
    """Yield a fresh temp directory beside ``target``; when the block succeeds it replaces ``target`` (any old
    content is moved aside first, then removed); when it fails nothing is left behind."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    old = target.parent / f".{target.name}-old-{os.getpid()}"
    try:
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        if target.exists():
            os.replace(target, old)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def git_commit() -> dict:
    """The repository's commit and whether tracked files outside ``results/`` differ from it (``dirty``: the code
    or configuration, not committed outputs a run rewrites), read once per process: the code this process loaded,
    even when later commits land while it runs (a long sweep records the same state for every point)."""
    return dict(_git_state())


@functools.cache
def _git_state() -> dict:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=repo_root(), capture_output=True, text=True, timeout=10).stdout.strip()

    try:
        changed = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)results")
        return {"commit": git("rev-parse", "HEAD") or None, "dirty": bool(changed)}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def environment(device: str) -> dict:
    """Interpreter, platform, CPU and intra-op thread count (timings depend on them), package versions, git state."""
    import torch

    versions = {}
    for pkg in PACKAGES:
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return {"python": sys.version.split()[0], "platform": platform.platform(), "processor": platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": device, "packages": versions, "git": git_commit()}


def peak_memory_mb() -> float:
    """Peak resident memory of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def summarise(values: list[float]) -> dict:
    """Mean and standard error (``scipy.stats.sem``) of per-question values."""
    arr = np.asarray(values, float)
    se = float(stats.sem(arr)) if len(arr) > 1 else float("nan")
    return {"mean": float(arr.mean()), "se": se, "n": int(len(arr))}


def combine_folds(per_fold: list[dict]) -> dict:
    """Mean of the fold means (ITI's convention) and its standard error sqrt(Σ se²)/F."""
    means = [f["mean"] for f in per_fold]
    ses = [f["se"] for f in per_fold]
    se = math.sqrt(sum(s * s for s in ses)) / len(ses) if all(math.isfinite(s) for s in ses) else float("nan")
    return {"mean": float(np.mean(means)), "se": se, "n": int(sum(f["n"] for f in per_fold))}


def config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:12]


def new_run_id(model: str, method: str, task: str) -> str:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    safe = model.replace("/", "_")
    return f"{stamp}-{safe}-{method}-{task}"


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
