"""One benchmark run: load model and data, fit the method per fold, evaluate the task's parts, write the run directory.

A task is a tuple of parts — ``mc`` (MC1/2/3), ``gen`` (generation + judge), ``fluency`` (the answers' NLL under the
unintervened model), ``klce`` (CE/KL vs the unintervened model) — each saved per fold as it finishes (generations and
verdicts per batch), so ``--resume`` continues an interrupted run where it stopped and reaches the same numbers. A
run finished before a part existed gains it on ``--resume`` (and in sweeps and ``make reproduce-table1``): only the
missing part is computed.
"""

from __future__ import annotations

import json
import time
from dataclasses import MISSING, asdict, dataclass, field, fields
from functools import cached_property
from pathlib import Path

import torch

from bench.data.truthfulqa import Question, checksum, load_truthfulqa, make_folds
from bench.generation import GEN_PRESETS, answer_context, clean_answer, gen_prompt, generate
from bench.interventions import Intervention, get_method
from bench.judges import JudgeItem, get_judge, judge_names, judge_saved
from bench.methods import FitContext, probe_layer
from bench.metrics.fluency import continuation_nll
from bench.metrics.generation import GEN_METRICS, combine_fold_metrics, generation_metrics
from bench.models import REGISTRY, LoadedModel, load_model, resolve_alias
from bench.paths import repo_root
from bench.report import results_table
from bench.runs import (
    SCHEMA_VERSION,
    append_progress,
    config_hash,
    environment,
    git_commit,
    new_run_id,
    now_iso,
    peak_memory_mb,
    read_progress,
    run_lock,
    summarise,
    write_json,
    write_text,
)
from bench.sites import SITES
from bench.tasks.kl_ce import kl_ce, load_texts, make_windows
from bench.tasks.lm_eval_task import evaluate_lm_eval, parse_tasks
from bench.tasks.toxicity import (
    STEER_SOURCES,
    TOXICITY_METHODS,
    TOXICITY_METRICS,
    evaluate_toxicity,
    evaluation_prompts,
    steering_fold,
    steering_questions,
)
from bench.tasks.truthfulqa_mc import evaluate_mc

TASKS: dict[str, tuple[str, ...]] = {
    "truthfulqa-mc": ("mc",),
    "truthfulqa-gen": ("gen", "fluency"),
    "truthfulqa": ("mc", "gen", "fluency", "klce"),
    "kl-ce": ("klce",),
    "toxicity": ("toxicity",),
}
DEFAULT_MAX_NEW_TOKENS = {"toxicity": 20}  # every other task: 50 (ITI's TruthfulQA generation)
MC_METRICS = ("mc1", "mc2", "mc3")
FLUENCY_METRICS = ("answer_nll", "empty_share")
#: The metrics each part adds to a fold (``lm-eval``: whatever the lm-eval tasks report).
PART_METRICS = {"mc": MC_METRICS, "gen": GEN_METRICS, "fluency": FLUENCY_METRICS, "klce": ("ce", "kl"),
                "toxicity": TOXICITY_METRICS}
#: Parts computed from another part's output: recomputed whenever that part is.
PART_INPUTS = {"fluency": "gen"}


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
    eval_batch_size: int = 16
    prefix_cache: bool = True
    device: str | None = None
    dtype: str | None = None
    gen_preset: str = "iti"
    max_new_tokens: int | None = None  # None: 50 for TruthfulQA generation, 20 for toxicity
    gen_batch_size: int = 32
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
    #: embedding fed strided slices): the same numbers up to float ties, kept for ``python -m bench.perf``
    legacy_paths: bool = False
    compile: bool = True  # torch.compile a method's training step where it has one (FLORAIN): float noise only


#: Settings that change a run's numbers by float noise at most (batch sizes; decoding code paths); not part of what
#: makes two runs the same run.
NOT_IDENTITY = ("eval_batch_size", "gen_batch_size", "sample_batch_size", "legacy_paths", "compile")


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
        parts = _parts(cfg.task)
    except ValueError as err:
        problems, parts = [*problems, str(err)], ()
    if cfg.site not in SITES:
        problems.append(f"unknown site {cfg.site!r}; valid: {', '.join(SITES)}")
    if cfg.gen_preset not in GEN_PRESETS:
        problems.append(f"unknown generation prompt preset {cfg.gen_preset!r}; valid: {', '.join(GEN_PRESETS)}")
    if cfg.prompt_mode not in MC_MODES:
        problems.append(f"unknown --prompt-mode {cfg.prompt_mode!r}; valid: {', '.join(MC_MODES)}")
    for name, value, low in (("--max-new-tokens", cfg.max_new_tokens, 1), ("--kl-windows", cfg.kl_windows, 1),
                             ("--kl-length", cfg.kl_length, 2), ("--samples", cfg.samples, 1),
                             ("--limit", cfg.limit, 1), ("--mc-edit-offset", cfg.mc_edit_offset, 0)):
        if value is not None and value < low:
            problems.append(f"{name} must be ≥ {low}, got {value}")
    if not 0.0 < cfg.top_p <= 1.0:  # (NaN fails this too)
        problems.append(f"--top-p must lie in (0, 1], got {cfg.top_p}")
    if not 0.0 <= cfg.val_ratio < 1.0:
        problems.append(f"--val-ratio must lie in [0, 1), got {cfg.val_ratio}")
    if cfg.eval_split not in ("test", "val"):
        problems.append(f"unknown evaluation split {cfg.eval_split!r}; valid: test, val")
    return problems + _task_problems(cfg, parts) + _resource_problems(cfg)


def _task_problems(cfg: RunConfig, parts: tuple[str, ...]) -> list[str]:
    """Checks that depend on the task: folds, toxicity's settings, the judge."""
    problems = []
    folds = 1 if cfg.task == "toxicity" else cfg.folds
    if cfg.task == "toxicity":
        from bench.toxicity.base import scorer_names

        if cfg.method not in TOXICITY_METHODS:
            problems.append(f"{cfg.method} has no detoxifying variant; --task toxicity takes: "
                            f"{', '.join(TOXICITY_METHODS)}")
        if cfg.steer_data not in STEER_SOURCES:
            problems.append(f"unknown --steer-data {cfg.steer_data!r}; valid: {', '.join(STEER_SOURCES)}")
        if cfg.scorer not in scorer_names():
            problems.append(f"unknown toxicity scorer {cfg.scorer!r}; valid: {', '.join(scorer_names())}")
    elif cfg.folds < 2:
        problems.append(f"--folds must be ≥ 2 (cross-validation), got {cfg.folds}")
    elif cfg.limit is not None and 1 <= cfg.limit < cfg.folds:
        problems.append(f"--limit {cfg.limit} is too small for {cfg.folds} folds")
    if cfg.eval_folds is not None:
        bad = [k for k in cfg.eval_folds if not 0 <= int(k) < folds]
        if bad or not cfg.eval_folds:
            problems.append(f"evaluation folds {bad or '[]'} out of range: valid 0..{folds - 1}")
    if "gen" in parts and cfg.judge not in judge_names():
        problems.append(f"unknown judge {cfg.judge!r}; valid: {', '.join(judge_names())}")
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


def _parts(task: str) -> tuple[str, ...]:
    if task.startswith("lm-eval:"):
        return ("lm-eval",)
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; valid: {', '.join(TASKS)}, lm-eval:TASK[,TASK]")
    return TASKS[task]


def missing_parts(out: Path, task: str, folds: list[int]) -> list[str]:
    """The parts (as ``fold_K.PART``) whose metrics the fold files of a run directory lack for ``task`` on ``folds``:
    a fold not finished, or a part added to the task after the run finished. A finished fold counts by its metrics,
    not its part files, so runs written before part files existed stay complete."""
    missing = []
    # a committed run keeps results.json but not its fold files (they repeat it): its folds' metrics count too
    summary = out / "results.json"
    recorded = {f["fold"]: f["metrics"] for f in json.loads(summary.read_text())["folds"]} if summary.exists() else {}
    for k in folds:
        f = out / f"fold_{k}.json"
        have = set(json.loads(f.read_text())["metrics"]) if f.exists() else (
            set(recorded[k]) if k in recorded else None)
        missing += [f"fold_{k}.{p}" for p in _parts(task)
                    if have is None or not set(PART_METRICS.get(p, ())) <= have]
    return missing


class _Run:
    """State shared by the folds of one run: model, judge, KL windows, output directory."""

    def __init__(self, cfg: RunConfig, lm: LoadedModel, out: Path, data_dir: str | None, resume: bool, echo):
        self.cfg, self.lm, self.out, self.data_dir, self.resume, self.echo = cfg, lm, out, data_dir, resume, echo
        self._windows = None
        self.kl_source: str | None = None
        self.tox_prompts: list = []
        self.reused: list[str] = []  # files of an earlier process this run continued from (resume)
        self.git: dict[str, dict | None] = {}  # fit/part file → git state of the process that wrote it

    def _options(self, backend: str, options: dict) -> dict:
        """Backend options; the ``embedded`` backends also get the run's data directory (to train on first use)."""
        return {**({"data_dir": self.data_dir} if backend == "embedded" else {}), **options}

    @cached_property
    def scorer(self):
        from bench.toxicity.base import get_scorer

        return get_scorer(self.cfg.scorer, **self._options(self.cfg.scorer, self.cfg.scorer_options))

    @cached_property
    def fluency_lm(self) -> LoadedModel:
        if self.cfg.fluency_model == self.cfg.model:
            return self.lm
        return load_model(self.cfg.fluency_model, self.cfg.device, self.cfg.dtype)

    @cached_property
    def judge(self):
        return get_judge(self.cfg.judge, **self._options(self.cfg.judge, self.cfg.judge_options))

    def windows(self) -> torch.Tensor:
        if self._windows is None:
            texts, self.kl_source = load_texts(self.cfg.kl_source, self.data_dir, self.cfg.seed)
            self._windows = make_windows(self.lm, texts, self.cfg.kl_windows, self.cfg.kl_length)
        return self._windows

    # ------------------------------------------------------------------ parts

    def mc(self, k: int, qs: list[Question], iv: Intervention | None) -> dict:
        recs = evaluate_mc(self.lm, qs, iv, self.cfg.prompt_mode, self.cfg.eval_batch_size, self.cfg.prefix_cache,
                           fewshot=iv.prompt_prefix if iv else "", label=f"fold {k} MC",
                           edit_offset=self.cfg.mc_edit_offset)
        return {"metrics": {m: summarise([r[m] for r in recs]) for m in MC_METRICS}, "records": recs}

    def gen(self, k: int, qs: list[Question], iv: Intervention | None) -> dict:
        cfg = self.cfg
        gen_file, verdict_file = self.out / f"generations_fold{k}.jsonl", self.out / f"judgements_fold{k}.jsonl"
        done = {r["index"]: r for r in read_progress(gen_file)}
        if done:
            self.echo(f"fold {k}: reusing {len(done)} saved generations")
        prompts = [gen_prompt(q.question, cfg.gen_preset, iv.prompt_prefix if iv else "") for q in qs]

        def save(idx: list[int], texts: list[str]) -> None:
            recs = [{"index": qs[i].index, "continuation": t, "answer": clean_answer(t)} for i, t in zip(idx, texts)]
            append_progress(gen_file, recs)
            done.update({r["index"]: r for r in recs})

        skip = {i for i, q in enumerate(qs) if q.index in done}
        generate(self.lm, prompts, iv, cfg.max_new_tokens or 50, cfg.gen_batch_size, on_batch=save, skip=skip,
                 progress=f"fold {k} generation ({len(qs)} questions)", prefix_cache=not cfg.legacy_paths)
        verdicts = judge_saved(self.judge, verdict_file,
                               {q.index: JudgeItem(q.question, done[q.index]["answer"], q.correct, q.incorrect)
                                for q in qs})
        recs = []
        for q in qs:
            v = verdicts[q.index]
            recs.append({"index": q.index, "question": q.question, "answer": done[q.index]["answer"],
                         "p_true": v["p_true"], "p_info": v["p_info"],
                         "true": v["p_true"] >= 0.5, "info": v["p_info"] >= 0.5})
        return {"metrics": generation_metrics([r["true"] for r in recs], [r["info"] for r in recs]), "records": recs}

    def fluency(self, k: int, qs: list[Question], iv: Intervention | None) -> dict:
        """NLL per token of each generated answer under the unintervened model (``iv`` is deliberately not applied),
        given the base generation prompt (without a few-shot prefix, so every method is read in the same context).
        Degenerate text that the judge may still call true shows here. ``empty_share``: answers with no text."""
        gen_file = self.out / f"generations_fold{k}.jsonl"
        gens = {r["index"]: r for r in read_progress(gen_file)}
        if missing := [q.index for q in qs if q.index not in gens]:
            raise RuntimeError(f"fold {k}: {gen_file} lacks the answers to {len(missing)} questions (e.g. {missing[:5]}); "
                               f"remove fold_{k}.gen.json and resume to generate them again")
        pairs = [answer_context(gen_prompt(q.question, self.cfg.gen_preset), gens[q.index]["continuation"]) for q in qs]
        nll = continuation_nll(self.lm, [c for c, _ in pairs], [a for _, a in pairs], self.cfg.eval_batch_size,
                               progress=f"fold {k} answer fluency ({len(qs)} answers)")
        empty = [float(not gens[q.index]["answer"]) for q in qs]
        kept = [v for v in nll if v is not None]
        metrics = {"answer_nll": summarise(kept) if kept else {"mean": float("nan"), "se": float("nan"), "n": 0},
                   "empty_share": summarise(empty)}
        return {"metrics": metrics, "records": [{"index": q.index, "answer_nll": v, "empty_share": e}
                                                for q, v, e in zip(qs, nll, empty)]}

    def toxicity(self, k: int, qs: list[Question], iv: Intervention | None) -> dict:
        cfg = self.cfg
        return evaluate_toxicity(self.lm, self.tox_prompts, iv, self.scorer, self.fluency_lm,
                                 self.out / f"samples_fold{k}.jsonl", cfg.samples, cfg.max_new_tokens, cfg.top_p,
                                 cfg.seed, cfg.sample_batch_size, self.echo, prefix_cache=not cfg.legacy_paths)

    def klce(self, k: int, qs: list[Question], iv: Intervention | None) -> dict:
        vals = kl_ce(self.lm, self.windows(), iv, batch_size=self.cfg.eval_batch_size)
        return {"metrics": {m: summarise(v) for m, v in vals.items()}, "windows": vals, "source": self.kl_source}

    # ------------------------------------------------------------------ folds

    def fold_layer(self, ctx: FitContext, k: int) -> int:
        """The fold's layer by the released probe rule on its own training/validation questions (cached per fold)."""
        layer_file = self.out / f"fold_{k}.layer.json"
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
        fit_file, int_dir = self.out / f"fold_{k}.fit.json", self.out / f"intervention_fold{k}"
        if self.resume and fit_file.exists():
            info = json.loads(fit_file.read_text())
            iv = Intervention.from_pretrained(int_dir) if info["intervention"] else None
            self.echo(f"fold {k}: reusing the fitted {self.cfg.method} in {int_dir if iv else '(none)'}")
            self.reused.append(fit_file.name)
            self.git[fit_file.name] = info.get("git")
            return iv, info["fit_s"], info["intervention"]
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
        self.git[fit_file.name] = git = git_commit()
        write_json(fit_file, {"fit_s": fit_s, "intervention": rel, "git": git})
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
        echo=print) -> dict:
    """Execute a run and return its results dict (also written to ``<output>/results.json``). One process at a
    time writes a given ``output`` (a second is refused, naming the first); a new default folder is unique."""
    if output is None:
        return _run(cfg, None, data_dir, resume, echo)
    with run_lock(Path(output)):
        return _run(cfg, output, data_dir, resume, echo)


def _run(cfg: RunConfig, output: Path | None, data_dir: str | None, resume: bool, echo) -> dict:
    t0 = time.perf_counter()
    method = get_method(cfg.method)
    check_config(cfg)  # every problem at once, before data, model or any file
    cfg.options = method.given_options(cfg.options)
    parts = _parts(cfg.task)
    lm_eval_tasks = parse_tasks(cfg.task) if cfg.task.startswith("lm-eval:") else None
    if cfg.max_new_tokens is None:
        cfg.max_new_tokens = DEFAULT_MAX_NEW_TOKENS.get(cfg.task, 50)
    toxicity = cfg.task == "toxicity"
    if toxicity:
        cfg.folds = 1  # fitted once on the steering texts, evaluated on every prompt
    if cfg.eval_folds is not None:
        cfg.eval_folds = sorted({int(k) for k in cfg.eval_folds})
    if toxicity:
        tox_prompts, avoid, source = evaluation_prompts(cfg.tox_prompts, data_dir, cfg.limit, cfg.eval_split)
        questions = steering_questions(cfg.steer_data, avoid, data_dir, cfg.seed)
    else:
        questions, source = load_truthfulqa(data_dir)
        if cfg.limit is not None:
            if cfg.limit > len(questions):
                echo(f"--limit {cfg.limit} is larger than the data ({len(questions)} questions): using all of them")
            questions = questions[: cfg.limit]
    lm = load_model(cfg.model, cfg.device, cfg.dtype)
    if cfg.legacy_paths and lm.head_hook is not None:
        lm.head_hook.remove()
    env = environment(str(next(lm.model.parameters()).device))  # read at the start: the code that runs
    if method.needs_layer:
        if cfg.layer is None:
            cfg.layer = lm.default_layer  # the paper's layer; None: chosen per fold inside the run
        if cfg.layer is not None:
            lm.spec.check_layer(cfg.layer)
    else:
        cfg.layer = None
    out = Path(output) if output else repo_root() / "results" / "runs" / new_run_id(cfg.model, cfg.method, cfg.task)
    ident = identity_config(cfg)
    if method.version > 1:  # recorded only from version 2 on, so version-1 runs keep their identity
        ident["method_version"] = method.version
    marker = out / "run_config.json"
    if out.exists() and (out / "results.json").exists() and not resume:
        raise FileExistsError(f"{out} already holds a finished run; choose another --output or pass --resume")
    if marker.exists() and not same_identity(json.loads(marker.read_text()).get("config", {}), ident):
        raise ValueError(f"cannot {'resume' if resume else 'reuse'} {out}: it was started with a different "
                         "configuration (see its run_config.json); choose another --output")
    if marker.exists() and not resume:
        raise FileExistsError(f"{out} holds an unfinished run; pass --resume to continue it or choose another --output")
    write_json(marker, {"hash": config_hash(ident), "config": ident})
    data_sum = checksum(questions)
    if toxicity:
        folds = [steering_fold(len(questions), cfg.val_ratio, cfg.seed)]
        data_sum = config_hash({"steering": data_sum, "prompts": [p.text for p in tox_prompts]})
    else:
        folds = make_folds(len(questions), cfg.folds, cfg.val_ratio, cfg.seed)
        if cfg.eval_folds is not None:
            folds = [f for f in folds if f.fold in cfg.eval_folds]
    state = _Run(cfg, lm, out, data_dir, resume, echo)
    if toxicity:
        state.tox_prompts = tox_prompts
    fold_results = []
    for fold in folds:
        fold_file = out / f"fold_{fold.fold}.json"
        if resume and fold_file.exists() and not missing_parts(out, cfg.task, [fold.fold]):
            echo(f"fold {fold.fold}: already done, reusing {fold_file}")
            state.reused.append(fold_file.name)
            fold_results.append(json.loads(fold_file.read_text()))
            state.git.update(fold_results[-1].get("git") or {fold_file.name: None})
            continue
        ctx = FitContext(lm, questions, fold, cfg.layer if cfg.layer is not None else -1, cfg.site,
                         method.parse(cfg.options), data_sum, text_format="continuation" if toxicity else "qa",
                         seed=cfg.seed, compile=cfg.compile)
        if method.needs_layer and cfg.layer is None:
            ctx.layer = state.fold_layer(ctx, fold.fold)
        iv, fit_s, int_rel = state.intervention(method, ctx, fold.fold)
        # toxicity: none (its prompts are the evaluation set); eval_split "val": the fold's validation questions
        test_qs = [questions[i] for i in (fold.val if cfg.eval_split == "val" else fold.test)]
        results_parts, timings = {}, {"fit_s": fit_s}
        computed: set[str] = set()
        for part in parts:
            part_file = out / f"fold_{fold.fold}.{part}.json"
            if resume and part_file.exists() and PART_INPUTS.get(part) not in computed:
                results_parts[part] = json.loads(part_file.read_text())
                state.reused.append(part_file.name)
                state.git[part_file.name] = results_parts[part].get("git")
                timings[f"{part}_s"] = results_parts[part]["seconds"]
                continue
            tp = time.perf_counter()
            if part == "lm-eval":
                if iv is not None and not iv.modules:
                    raise ValueError(f"{cfg.method} is prompt-only; lm-eval tasks take --num_fewshot instead")
                res = {"metrics": evaluate_lm_eval(lm, iv, lm_eval_tasks, test_qs, out / f"lm_eval_fold{fold.fold}",
                                                   cfg.eval_batch_size)}
            else:
                res = getattr(state, part)(fold.fold, test_qs, iv)
            res["seconds"] = timings[f"{part}_s"] = time.perf_counter() - tp
            res["git"] = state.git[part_file.name] = git_commit()
            write_json(part_file, res)
            # one line per part: progress bars do not draw when the output is a log file
            echo(f"fold {fold.fold}: {part} done in {res['seconds']:.1f} s ({_scores(res['metrics'])})")
            results_parts[part] = res
            computed.add(part)
        metrics = {m: v for p in results_parts.values() for m, v in p["metrics"].items()}
        fr = {
            "fold": fold.fold, "n_train": len(fold.train), "n_val": len(fold.val), "n_test": len(fold.test),
            "layer": ctx.layer if method.needs_layer else None, "metrics": metrics,
            "timings": {**timings, "eval_s": sum(v for k, v in timings.items() if k != "fit_s"),
                        **({"toxicity_stages": results_parts["toxicity"]["stages"]}
                           if "stages" in results_parts.get("toxicity", {}) else {})},
            "intervention": int_rel,
            "intervention_info": {k: v for k, v in (iv.config if iv else {}).items()
                                  if k not in ("model", "data_checksum")},
            "kl_ce_windows": results_parts.get("klce", {}).get("windows"),
            "kl_ce_source": results_parts.get("klce", {}).get("source"),
            "counts": results_parts.get("toxicity", {}).get("counts"),
            # the code behind each number: git state of the process that wrote the fit and each part
            "git": {n: g for n, g in state.git.items() if n.startswith(f"fold_{fold.fold}.")},
            "per_question": _merge_records(results_parts),
        }
        write_json(fold_file, fr)
        fold_results.append(fr)
        echo(f"fold {fold.fold}: " + _scores(metrics)
             + f" ({len(state.tox_prompts) if toxicity else len(test_qs)} {'prompts' if toxicity else 'questions'}, "
               f"eval {fr['timings']['eval_s']:.1f} s)")
    combined = combine_fold_metrics([f["metrics"] for f in fold_results])
    if toxicity:
        data = {"prompts": source, "n_prompts": len(tox_prompts), "steering": cfg.steer_data,
                "n_steering_groups": len(questions), "checksum": data_sum,
                "counts": fold_results[0].get("counts")}
    else:
        data = {"truthfulqa": source, "checksum": data_sum, "n_questions": len(questions)}
    if "klce" in parts:
        # the texts' source as each fold's KL/CE part recorded it (a part written before parts recorded it: load
        # the texts again, which may ask the Hub)
        sources = {f.get("kl_ce_source") for f in fold_results}
        if None in sources:
            state.windows()
            sources = (sources - {None}) | {state.kl_source}
        data["kl_ce_texts"] = {"source": " + ".join(sorted(sources)), "windows": cfg.kl_windows,
                               "tokens": cfg.kl_length}
    # a finished run resumed to add a part: keep the wall times of the processes that wrote it before
    earlier = []
    if (out / "results.json").exists():
        before = json.loads((out / "results.json").read_text())["timings"]
        earlier = [*before.get("earlier_total_s", []), before["total_s"]]
    results = {
        "schema_version": SCHEMA_VERSION,
        "created": now_iso(),
        "config": {**asdict(cfg)},
        "method_version": method.version,
        "method_options": method.effective_options(cfg.options),  # every option, defaults filled in
        "model": {"name": lm.name, "identity": lm.identity, "spec": asdict(lm.spec)},
        "data": data,
        "judge": state.judge.identity() if "gen" in parts else None,
        "scorer": {**state.scorer.identity(), "fluency_model": state.fluency_lm.identity} if toxicity else None,
        # environment: this process; git_by_file: the process that computed each fit and part (None: written
        # before parts recorded it), which differs from ``environment.git`` for a resumed or upgraded run
        "environment": {**env, "git_by_file": dict(sorted(state.git.items()))},
        "metrics": combined,
        "folds": [{k: v for k, v in f.items() if k not in ("per_question", "kl_ce_windows", "kl_ce_source", "git")}
                  for f in fold_results],
        # total_s: this process's wall time (earlier_total_s: those of earlier processes that had finished the run);
        # fit_s/eval_s: the work behind every number, summed over the processes of a resumed run (``reused`` lists
        # what an earlier process had finished)
        "timings": {"total_s": time.perf_counter() - t0, "earlier_total_s": earlier,
                    "fit_s": sum(f["timings"]["fit_s"] for f in fold_results),
                    "eval_s": sum(f["timings"]["eval_s"] for f in fold_results),
                    "reused": state.reused},
        "peak_memory_mb": peak_memory_mb(),
    }
    write_text(out / "per_question.jsonl", "".join(json.dumps({"fold": f["fold"], **r}) + "\n"
                                                   for f in fold_results for r in f["per_question"]))
    write_json(out / "results.json", results)
    (out / "results.md").write_text(results_table([results], tuple(results["metrics"])) + "\n")
    results["run_dir"] = str(out)
    return results
