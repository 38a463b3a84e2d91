"""One benchmark run: load model and data, fit the method per fold, evaluate the task's parts, write the run directory.

The runner knows no task by name: a task (:mod:`bench.tasks`) declares its parts — e.g. TruthfulQA's ``mc``,
``gen``, ``fluency`` and ``klce`` — and how its inputs load. Each part is saved per fold as it finishes (generations
and verdicts per batch), so ``--resume`` continues an interrupted run where it stopped and reaches the same numbers.
A run finished before a part existed gains it on ``--resume`` (and in sweeps and ``make reproduce-table1``): only the
missing part is computed.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

import torch

from bench.data.truthfulqa import Fold, Question
from bench.generation import GEN_PRESETS
from bench.interventions import DamagedInterventionError, Intervention, get_method, saved_digest
from bench.methods import FitContext, probe_layer
from bench.metrics.generation import combine_fold_metrics
from bench.models import REGISTRY, LoadedModel, load_model, resolve_alias
from bench.paths import repo_root
from bench.report import results_table
from bench.runs import (
    SCHEMA_VERSION,
    RunFolder,
    config_hash,
    environment,
    git_commit,
    new_run_id,
    now_iso,
    peak_memory_mb,
    run_lock,
    write_json,
    write_text,
)
from bench.sites import SITES
from bench.tasks import PARTS, Inputs, Task, get_task


@dataclass
class RunConfig:
    """Everything that determines a run's numbers (recorded verbatim in results.json)."""

    method: str = "florain"
    model: str = "smollm2-135m"
    task: str = "truthfulqa-mc"
    layer: int | None = None
    site: str = "heads"
    folds: int = 2
    val_ratio: float = 0.2
    seed: int = 42
    limit: int | None = None
    prompt_mode: str = "iti"
    options: dict = field(default_factory=dict)  # the method's options given explicitly (see `bench methods show`)
    eval_batch_size: int = 16  # sequences per forward pass of KL/CE (windows) and lm-eval tasks
    score_batch_size: int = 32  # answers per forward pass of the answer scorer (MC, answer and toxicity fluency): faster than
    # 16, 24, 48 and 64 on 150 questions (smollm2, 2026-12-04; results/README.md)
    prefix_cache: bool = True
    device: str | None = None
    dtype: str | None = None
    gen_preset: str = "iti"
    max_new_tokens: int | None = None  # None: 50 for TruthfulQA generation, 20 for toxicity
    gen_batch_size: int = 128  # decoding rows per step: faster than 64 (results/perf.md) and than 256 (408 answers,
    # smollm2, 2026-12-03)
    judge: str = "embedded"
    judge_options: dict = field(default_factory=dict)  # backend settings (never secrets: keys come from the environment)
    kl_windows: int = 100
    kl_length: int = 128
    kl_source: str | None = None  # None: the Hub's openwebtext-10k when reachable, else RTP prompt texts
    tox_prompts: str = "challenging"  # challenging | toxic | nontoxic | a JSONL path
    samples: int = 25
    top_p: float = 0.9
    scorer: str = "embedded"
    scorer_options: dict = field(default_factory=dict)
    fluency_model: str = "gemma3-270m"
    steer_data: str = "gpt2-gens"  # fitting texts of detoxifying interventions (see bench.tasks.toxicity)
    sample_batch_size: int = 50
    eval_split: str = "test"  # "test": each fold's test questions; "val": its validation questions (tuning, sweeps)
    eval_folds: list[int] | None = None  # evaluate only these folds (None: all), e.g. [0] for a quick check
    mc_edit_offset: int = 0  # MC: edit from answer token N on, so answer tokens 0..N are scored unintervened (ITI: 1)
    #: the code paths before the speed work (HF ``generate`` on left-padded batches, no shared prefix, the output
    #: embedding fed strided slices, key/value heads copied per query head): the same numbers up to float ties,
    #: kept for ``python -m bench.perf``
    legacy_paths: bool = False
    compile: bool = True  # torch.compile a method's training step where it has one (FLORAIN): float noise only


#: Settings that change a run's numbers by float noise at most (batch sizes; decoding code paths); not part of what
#: makes two runs the same run.
NOT_IDENTITY = ("eval_batch_size", "score_batch_size", "gen_batch_size", "sample_batch_size", "legacy_paths", "compile")


def identity_config(cfg: RunConfig) -> dict:
    return {k: v for k, v in asdict(cfg).items() if k not in NOT_IDENTITY}


def same_identity(recorded: dict, ident: dict) -> bool:
    """The one rule for "the same run" (``bench run --resume``, sweeps, reproduce): every identity field equal,
    a field either side lacks counting as its default (runs recorded before a field existed), and the method's
    options equal once every default is filled in (``-O lam=5`` equals no ``lam``; names recorded by earlier
    versions are read). ``ident`` may leave fields to the runner: the sweep's caller does (see bench.sweep)."""
    defaults = {f.name: f.default_factory() if f.default_factory is not MISSING else f.default
                for f in fields(RunConfig)}
    keys = (set(recorded) | set(ident)) - set(NOT_IDENTITY) - {"options"}
    if any(recorded.get(k, defaults.get(k)) != ident.get(k, defaults.get(k)) for k in keys):
        return False
    method = get_method(ident.get("method", defaults["method"]))
    try:
        theirs = method.effective_options(recorded.get("options", {}), recorded=True)
    except (ValueError, TypeError):
        return False  # options this version of the method does not have: not the same run
    return theirs == method.effective_options(ident.get("options", {}))


def _check_problems(cfg: RunConfig) -> list[str]:
    """What is wrong with ``cfg``, each with the valid values (empty: nothing)."""
    from bench.prompts import MC_MODES

    problems = []
    try:
        get_method(cfg.method).given_options(cfg.options)
    except ValueError as err:
        problems.append(str(err))
    try:
        task = get_task(cfg.task)
    except ValueError as err:
        problems, task = [*problems, str(err)], None
    if cfg.site not in SITES:
        problems.append(f"unknown site {cfg.site!r}; valid: {', '.join(SITES)}")
    if cfg.gen_preset not in GEN_PRESETS:
        problems.append(f"unknown generation prompt preset {cfg.gen_preset!r}; valid: {', '.join(GEN_PRESETS)}")
    if cfg.prompt_mode not in MC_MODES:
        problems.append(f"unknown --prompt-mode {cfg.prompt_mode!r}; valid: {', '.join(MC_MODES)}")
    for name, value, low in (("--max-new-tokens", cfg.max_new_tokens, 1), ("--kl-windows", cfg.kl_windows, 1),
                             ("--kl-length", cfg.kl_length, 2), ("--samples", cfg.samples, 1),
                             ("--limit", cfg.limit, 1), ("--mc-edit-offset", cfg.mc_edit_offset, 0),
                             ("--layer", cfg.layer, 0), ("--eval-batch-size", cfg.eval_batch_size, 1),
                             ("--score-batch-size", cfg.score_batch_size, 1),
                             ("--gen-batch-size", cfg.gen_batch_size, 1),
                             ("--sample-batch-size", cfg.sample_batch_size, 1)):
        if value is not None and value < low:
            problems.append(f"{name} must be ≥ {low}, got {value}")
    if not 0.0 < cfg.top_p <= 1.0:  # (NaN fails this too)
        problems.append(f"--top-p must lie in (0, 1], got {cfg.top_p}")
    if not 0.0 <= cfg.val_ratio < 1.0:
        problems.append(f"--val-ratio must lie in [0, 1), got {cfg.val_ratio}")
    if cfg.eval_split not in ("test", "val"):
        problems.append(f"unknown evaluation split {cfg.eval_split!r}; valid: test, val")
    return problems + (_task_problems(cfg, task) if task else []) + _resource_problems(cfg)


def _task_problems(cfg: RunConfig, task: Task) -> list[str]:
    """Checks that depend on the task: folds, the task's and its parts' own settings."""
    problems = []
    folds = 1 if task.single_fit else cfg.folds
    if not task.single_fit and cfg.folds < 2:
        problems.append(f"--folds must be ≥ 2 (cross-validation), got {cfg.folds}")
    elif not task.single_fit and cfg.limit is not None and 1 <= cfg.limit < cfg.folds:
        problems.append(f"--limit {cfg.limit} is too small for {cfg.folds} folds")
    if cfg.eval_folds is not None:
        bad = [k for k in cfg.eval_folds if not 0 <= int(k) < folds]
        if bad or not cfg.eval_folds:
            problems.append(f"evaluation folds {bad or '[]'} out of range: valid 0..{folds - 1}")
    for check in (task.problems, *(PARTS[p].problems for p in task.parts)):
        problems += check(cfg) if check else []
    return problems + _unread_settings(cfg, task)


def settings_read(task: Task) -> set[str]:
    """The task-specific run settings (RunConfig fields) a task reads (``Task/Part.settings``)."""
    return {*task.settings, *(s for p in task.parts for s in PARTS[p].settings)}


def _unread_settings(cfg: RunConfig, task: Task) -> list[str]:
    """Settings changed from their defaults that the task would ignore (``Task/Part.settings``)."""
    from bench.tasks import TASKS

    defaults = {f.name: f.default for f in fields(RunConfig) if f.default is not MISSING}
    mine, problems = settings_read(task), []
    for name in sorted({s for t in TASKS.values() for s in settings_read(t)} - mine):
        if getattr(cfg, name) != defaults.get(name, getattr(cfg, name)):
            users = [t.name for t in TASKS.values() if name in settings_read(t)]
            problems.append(f"--{name.replace('_', '-')} applies to --task {' / '.join(users)} only, not to "
                            f"{task.name}")
    return problems


def _resource_problems(cfg: RunConfig) -> list[str]:
    """The model exists (alias, Hub id or local folder) and the device is there."""
    from bench.models import DTYPES

    problems = []
    local = cfg.model.startswith((".", "/")) or cfg.model.count("/") > 1
    if local and not Path(cfg.model).is_dir():
        problems.append(f"--model {cfg.model}: no such local folder (a Hub id is ORG/NAME; an alias is one of "
                        f"{', '.join(REGISTRY)})")
    elif cfg.model not in REGISTRY and "/" not in cfg.model and not Path(cfg.model).is_dir():
        try:
            resolve_alias(cfg.model)
        except ValueError as err:
            problems.append(str(err))
    if cfg.device is not None and cfg.device.startswith("cuda") and not torch.cuda.is_available():
        problems.append(f"--device {cfg.device}: no CUDA device is available here; use --device cpu (or leave it "
                        "out: cuda when available, else cpu)")
    if cfg.dtype is not None and cfg.dtype not in DTYPES:
        problems.append(f"unknown --dtype {cfg.dtype!r}; valid: {', '.join(DTYPES)}")
    return problems


def check_config(cfg: RunConfig) -> None:
    """Refuse a run configuration before anything is loaded or written, listing every problem at once."""
    problems = _check_problems(cfg)
    if len(problems) == 1:
        raise ValueError(problems[0])
    if problems:
        raise ValueError(f"{len(problems)} problems with this run:\n" + "\n".join(f"  - {p}" for p in problems))


def missing_parts(out: Path, task: str, folds: list[int]) -> list[str]:
    """The parts (as ``fold_K.PART``) whose metrics the fold files of a run directory lack for ``task`` on ``folds``:
    a fold not finished, or a part added to the task after the run finished. A finished fold counts by its metrics,
    not its part files, so runs written before part files existed stay complete."""
    missing, folder = [], RunFolder(out)
    # a committed run keeps results.json but not its fold files (they repeat it): its folds' metrics count too
    recorded = {f["fold"]: f["metrics"] for f in folder.read_results()["folds"]} if folder.finished() else {}
    for k in folds:
        f = folder.fold(k)
        have = set(json.loads(f.read_text())["metrics"]) if f.exists() else (
            set(recorded[k]) if k in recorded else None)
        missing += [folder.part(k, p).stem for p in get_task(task).parts
                    if have is None or not set(PARTS[p].metric_names) <= have]
    return missing


class RunState:
    """What the folds of one run share: config, model, run folder, the task's inputs, resources a part builds
    once per run (``shared``: a judge, a scorer, KL/CE windows) and what an earlier process had done (resume)."""

    def __init__(self, cfg: RunConfig, lm: LoadedModel, folder: RunFolder, data_dir: str | None, resume: bool, echo,
                 inputs: Inputs, refit: bool = False):
        self.cfg, self.lm, self.folder, self.data_dir, self.resume, self.echo = cfg, lm, folder, data_dir, resume, echo
        self.inputs = inputs
        self.refit = refit  # resuming: fit again a fold whose saved intervention is damaged or does not match
        self.shared: dict = {}
        self.reused: list[str] = []  # files of an earlier process this run continued from (resume)
        self.git: dict[str, dict | None] = {}  # fit/part file → git state of the process that wrote it

    def backend_options(self, backend: str, options: dict) -> dict:
        """An instrument's options; the ``embedded`` backends also get the run's data directory (to train on first
        use)."""
        return {**({"data_dir": self.data_dir} if backend == "embedded" else {}), **options}

    # ------------------------------------------------------------------ folds

    def fold_layer(self, ctx: FitContext, k: int) -> int:
        """The fold's layer by the released probe rule on its own training/validation questions (cached per fold)."""
        layer_file = self.folder.part(k, "layer")
        if layer_file.exists():
            return int(json.loads(layer_file.read_text())["layer"])
        t = time.perf_counter()
        scores = ctx.layer_probe_scores(self.cfg.seed)
        layer = probe_layer(scores)
        write_json(layer_file, {"layer": layer, "rule": "mean validation accuracy of per-head logistic probes "
                                "(released FLORAIN code), this fold's training/validation questions",
                                "mean_accuracy": scores.mean(1).tolist(), "seconds": time.perf_counter() - t})
        self.echo(f"fold {k}: layer {layer} by the probe rule (mean head accuracy {scores.mean(1)[layer]:.3f}, "
                  f"{time.perf_counter() - t:.1f} s)")
        return layer

    def intervention(self, method, ctx: FitContext, k: int) -> tuple[Intervention | None, float, str | None]:
        """Fit (or, resuming, reload) the fold's intervention; returns it, the fit seconds and its directory."""
        fit_file, int_dir = self.folder.part(k, "fit"), self.folder.intervention(k)
        if self.resume and fit_file.exists():
            info = json.loads(fit_file.read_text())
            try:
                iv = self._saved(info, method, ctx, k)
            except DamagedInterventionError as err:
                if not self.refit:
                    raise DamagedInterventionError(
                        f"fold {k}: {err}. Resume with --refit to fit fold {k} again (its evaluated parts are kept "
                        f"if the new fit is identical, else computed again), or remove {fit_file.name} and "
                        f"{int_dir.name}/") from None
                self.echo(f"fold {k}: {err}; fitting it again (--refit)")
                return self._fit(method, ctx, k, replaces=info)
            self.echo(f"fold {k}: reusing the fitted {self.cfg.method} in {int_dir if iv else '(none)'}")
            self.reused.append(fit_file.name)
            self.git[fit_file.name] = info.get("git")
            return iv, info["fit_s"], info["intervention"]
        return self._fit(method, ctx, k)

    def _saved(self, info: dict, method, ctx: FitContext, k: int) -> Intervention | None:
        """The fold's saved intervention, checked against what its fit recorded and against this run."""
        int_dir = self.folder.intervention(k)
        if not info.get("intervention"):
            return None
        iv = Intervention.from_pretrained(int_dir)  # missing or unreadable files: said precisely here
        if info.get("sha256") and saved_digest(int_dir) != info["sha256"]:
            raise DamagedInterventionError(f"{int_dir} is not what the fit saved (its files' SHA-256 differs from "
                                           f"the one in {self.folder.part(k, 'fit').name}: edited or damaged)")
        problems = []
        if iv.method != method.name:
            problems.append(f"it holds {iv.method}, this run fits {method.name}")
        if method.needs_layer and ctx.layer not in iv.layers:
            problems.append(f"it acts at layer(s) {iv.layers}, this fold's layer is {ctx.layer}")
        if iv.config.get("data_checksum") not in (None, ctx.data_checksum):
            problems.append("it was fitted on other data")
        try:
            iv.check_model(self.lm)
        except ValueError as err:
            problems.append(str(err))
        if problems:
            raise DamagedInterventionError(f"{int_dir} does not match this run: {'; '.join(problems)}")
        return iv

    def _fit(self, method, ctx: FitContext, k: int, replaces: dict | None = None):
        """Fit the fold's intervention and save it with its digest. Fitting a fold again (``replaces``: the record
        of its earlier fit) keeps the fold's evaluation only when the new fit is the same, file for file."""
        fit_file, int_dir = self.folder.part(k, "fit"), self.folder.intervention(k)
        t = time.perf_counter()
        iv = method.fit(ctx)
        fit_s = time.perf_counter() - t
        rel = None
        if iv is not None:
            iv.save_pretrained(int_dir)
            rel = int_dir.name
            where = f"layer(s) {iv.layers}" if iv.layers else "the prompt"
            self.echo(f"fold {k}: fitted {self.cfg.method} at {where} in {fit_s:.1f} s → {int_dir}")
            if iv.config.get("fit_summary"):
                self.echo(f"fold {k}: {iv.config['fit_summary']}")
        digest = saved_digest(int_dir) if iv is not None else None
        if replaces is not None and (digest is None or digest != replaces.get("sha256")):
            stale = [p for p in self.folder.evaluation(k) if p.exists()]
            for path in stale:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
            if stale:
                self.echo(f"fold {k}: the new fit differs from the saved one; computing its evaluation again "
                          f"(removed {', '.join(p.name for p in stale)})")
        self.git[fit_file.name] = git = git_commit()
        write_json(fit_file, {"fit_s": fit_s, "intervention": rel, "git": git, "sha256": digest})
        return iv, fit_s, rel


def _scores(metrics: dict) -> str:
    """``name mean, ...`` of the metrics that are summaries (for the log lines)."""
    return ", ".join(f"{m} {v['mean']:.4f}" for m, v in metrics.items() if isinstance(v, dict) and "mean" in v)


def _merge_records(parts: dict[str, dict]) -> list[dict]:
    by_index: dict[int, dict] = {}
    for part in parts.values():
        for r in part.get("records", []):
            by_index.setdefault(r["index"], {}).update(r)
    return [by_index[i] for i in sorted(by_index)]


def run(cfg: RunConfig, output: Path | None = None, data_dir: str | None = None, resume: bool = False,
        echo=print, refit: bool = False) -> dict:
    """Execute a run and return its results dict (also written to ``<output>/results.json``). One process at a
    time writes a given ``output`` (a second is refused, naming the first); a new default folder is unique.
    ``refit`` (with ``resume``): fit again a fold whose saved intervention is damaged or does not match the run."""
    if refit and not resume:
        raise ValueError("--refit applies to a resumed run only (--resume --refit)")
    if output is not None and Path(output).exists() and not Path(output).is_dir():
        raise ValueError(f"--output {output} is a file, not a folder; give a folder for the run")
    if output is None:
        return _run(cfg, None, data_dir, resume, echo)
    with run_lock(Path(output)):
        return _run(cfg, output, data_dir, resume, echo, refit)


def _settle(cfg: RunConfig, method) -> Task:
    """Check ``cfg`` (every problem at once, before data, model or any file) and fill in what the task decides."""
    check_config(cfg)
    task = get_task(cfg.task)
    cfg.options = method.given_options(cfg.options)
    if cfg.max_new_tokens is None:
        cfg.max_new_tokens = task.max_new_tokens
    if task.single_fit:
        cfg.folds = 1  # one fit (e.g. on steering texts), evaluated on every item
    if cfg.eval_folds is not None:
        cfg.eval_folds = sorted({int(k) for k in cfg.eval_folds})
    return task


def run_key(cfg: RunConfig) -> str:
    """The content hash of a run's identity: what can change its numbers, the method's options with every default
    filled in (so ``-O lam=5`` and no ``lam`` give one key) and the method's recipe version."""
    method = get_method(cfg.method)
    return config_hash({**identity_config(cfg), "options": method.effective_options(cfg.options),
                        "method_version": method.version})


def _claim(folder: RunFolder, cfg: RunConfig, method, resume: bool) -> None:
    """Write the folder's identity marker, or refuse a folder that holds another run (or a finished one without
    ``resume``)."""
    ident = identity_config(cfg)
    if method.version > 1:  # recorded only from version 2 on, so version-1 runs keep their identity
        ident["method_version"] = method.version
    out, marker = folder.path, folder.config
    if folder.finished() and not resume:
        raise FileExistsError(f"{out} already holds a finished run; choose another --output or pass --resume")
    if marker.exists() and not same_identity(json.loads(marker.read_text()).get("config", {}), ident):
        raise ValueError(f"cannot {'resume' if resume else 'reuse'} {out}: it was started with a different "
                         f"configuration (see its {marker.name}); choose another --output")
    if marker.exists() and not resume:
        raise FileExistsError(f"{out} holds an unfinished run; pass --resume to continue it or choose another --output")
    write_json(marker, {"hash": config_hash(ident), "key": run_key(cfg), "config": ident})


def _run(cfg: RunConfig, output: Path | None, data_dir: str | None, resume: bool, echo, refit: bool = False) -> dict:
    t0 = time.perf_counter()
    method = get_method(cfg.method)
    task = _settle(cfg, method)
    inputs = task.inputs(cfg, data_dir, echo)
    prepared = {p: PARTS[p].prepare(cfg, data_dir, echo) for p in task.parts if PARTS[p].prepare}
    lm = load_model(cfg.model, cfg.device, cfg.dtype, shared=not cfg.legacy_paths)  # legacy_paths edits the model
    if cfg.legacy_paths:
        lm.use_earlier_paths()
    env = environment(str(next(lm.model.parameters()).device))  # read at the start: the code that runs
    if method.needs_layer:
        if cfg.layer is None:
            cfg.layer = lm.default_layer  # the paper's layer; None: chosen per fold inside the run
        if cfg.layer is not None:
            lm.spec.check_layer(cfg.layer)
    else:
        cfg.layer = None
    folder = RunFolder(output or repo_root() / "results" / "runs" / new_run_id(cfg.model, cfg.method, cfg.task))
    _claim(folder, cfg, method, resume)
    state = RunState(cfg, lm, folder, data_dir, resume, echo, inputs, refit)
    state.shared.update(prepared)
    fold_results = [_fold(state, task, method, fold) for fold in inputs.folds]
    results = _results(state, task, method, fold_results, env, time.perf_counter() - t0)
    folder.write_per_question([{"fold": f["fold"], **r} for f in fold_results for r in f["per_question"]])
    write_text(folder.table, results_table([results], tuple(results["metrics"])) + "\n")
    write_json(folder.results, results)  # last: a folder with results.json holds a finished run
    results["run_dir"] = str(folder.path)
    return results


def _fold(state: RunState, task: Task, method, fold: Fold) -> dict:
    """One fold: reused when an earlier process finished it, else fitted and evaluated part by part."""
    cfg, folder, echo, inputs = state.cfg, state.folder, state.echo, state.inputs
    fold_file = folder.fold(fold.fold)
    if state.resume and fold_file.exists() and not missing_parts(folder.path, cfg.task, [fold.fold]):
        echo(f"fold {fold.fold}: already done, reusing {fold_file}")
        state.reused.append(fold_file.name)
        done = json.loads(fold_file.read_text())
        state.git.update(done.get("git") or {fold_file.name: None})
        return done
    ctx = FitContext(state.lm, inputs.questions, fold, cfg.layer if cfg.layer is not None else -1, cfg.site,
                     method.parse(cfg.options), inputs.checksum, text_format=task.text_format, seed=cfg.seed,
                     compile=cfg.compile)
    if method.needs_layer and cfg.layer is None:
        ctx.layer = state.fold_layer(ctx, fold.fold)
    iv, fit_s, int_rel = state.intervention(method, ctx, fold.fold)
    # eval_split "val": the fold's validation questions (a single-fit task evaluates its own items, e.g. prompts)
    test_qs = [inputs.questions[i] for i in (fold.val if cfg.eval_split == "val" else fold.test)]
    results_parts, timings = _fold_parts(state, task, fold.fold, test_qs, iv)
    timings["fit_s"] = fit_s
    extra: dict = {}
    for name, res in results_parts.items():
        extra.update(PARTS[name].fold_record(res) if PARTS[name].fold_record else {})
    timings = {**timings, "eval_s": sum(v for k, v in timings.items() if k != "fit_s"), **extra.pop("timings", {})}
    metrics = {m: v for p in results_parts.values() for m, v in p["metrics"].items()}
    fr = {
        "fold": fold.fold, "n_train": len(fold.train), "n_val": len(fold.val), "n_test": len(fold.test),
        "layer": ctx.layer if method.needs_layer else None, "metrics": metrics, "timings": timings,
        "intervention": int_rel,
        "intervention_info": {k: v for k, v in (iv.config if iv else {}).items()
                              if k not in ("model", "data_checksum")},
        **extra,
        # the code behind each number: git state of the process that wrote the fit and each part
        "git": {n: g for n, g in state.git.items() if n.startswith(folder.fold(fold.fold).stem + ".")},
        "per_question": _merge_records(results_parts),
    }
    write_json(fold_file, fr)
    echo(f"fold {fold.fold}: " + _scores(metrics) + f" ({task.evaluated(inputs, test_qs)} {task.items}, "
         f"eval {fr['timings']['eval_s']:.1f} s)")
    return fr


def _fold_parts(state: RunState, task: Task, k: int, test_qs: list[Question], iv: Intervention | None
                ) -> tuple[dict[str, dict], dict[str, float]]:
    """Each part of the task on the fold's items, reused from its part file when resuming (unless a part it reads
    was computed again); returns the parts' results and their seconds."""
    results_parts, timings = {}, {}
    computed: set[str] = set()
    for name in task.parts:
        part, part_file = PARTS[name], state.folder.part(k, name)
        if state.resume and part_file.exists() and part.reads not in computed:
            results_parts[name] = json.loads(part_file.read_text())
            state.reused.append(part_file.name)
            state.git[part_file.name] = results_parts[name].get("git")
            timings[f"{name}_s"] = results_parts[name]["seconds"]
            continue
        tp = time.perf_counter()
        res = part.evaluate(state, k, test_qs, iv)
        res["seconds"] = timings[f"{name}_s"] = time.perf_counter() - tp
        res["git"] = state.git[part_file.name] = git_commit()
        write_json(part_file, res)
        # one line per part (in a log file a loop's bar is a plain line a minute at most: bench.progress)
        state.echo(f"fold {k}: {name} done in {res['seconds']:.1f} s ({_scores(res['metrics'])})")
        results_parts[name] = res
        computed.add(name)
    return results_parts, timings


def _results(state: RunState, task: Task, method, fold_results: list[dict], env: dict, total_s: float) -> dict:
    """The run's ``results.json`` (the one results schema); each part adds its own records (``Part.finish``)."""
    cfg, lm = state.cfg, state.lm
    # a finished run resumed to add a part: keep the wall times of the processes that wrote it before
    earlier = []
    if state.folder.finished():
        before = state.folder.read_results()["timings"]
        earlier = [*before.get("earlier_total_s", []), before["total_s"]]
    private = {"per_question", "git", *(k for p in task.parts for k in PARTS[p].fold_private)}
    results = {
        "schema_version": SCHEMA_VERSION,
        "created": now_iso(),
        "config": {**asdict(cfg)},
        "method_version": method.version,
        "method_options": method.effective_options(cfg.options),  # every option, defaults filled in
        "model": {"name": lm.name, "identity": lm.identity, "spec": asdict(lm.spec)},
        "data": dict(state.inputs.data),
        "judge": None,  # the instruments a part used (Part.finish): the judge, the toxicity scorer
        "scorer": None,
        # environment: this process; git_by_file: the process that computed each fit and part (None: written
        # before parts recorded it), which differs from ``environment.git`` for a resumed or upgraded run
        "environment": {**env, "git_by_file": {}},
        "metrics": combine_fold_metrics([f["metrics"] for f in fold_results]),
        "folds": [{k: v for k, v in f.items() if k not in private} for f in fold_results],
        # total_s: this process's wall time (earlier_total_s: those of earlier processes that had finished the run);
        # fit_s/eval_s: the work behind every number, summed over the processes of a resumed run (``reused`` lists
        # what an earlier process had finished)
        "timings": {"total_s": total_s, "earlier_total_s": earlier,
                    "fit_s": sum(f["timings"]["fit_s"] for f in fold_results),
                    "eval_s": sum(f["timings"]["eval_s"] for f in fold_results),
                    "reused": state.reused},
        "peak_memory_mb": peak_memory_mb(),
    }
    for name in task.parts:
        if PARTS[name].finish:
            PARTS[name].finish(state, fold_results, results)
    results["environment"]["git_by_file"] = dict(sorted(state.git.items()))
    return results
