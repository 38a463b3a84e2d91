"""Score regression check: a fixed small benchmark compared with a committed reference, with tolerances.

``bench regress`` (``make regress``) runs :data:`DEFAULT` — smollm2-135m, the first 90 TruthfulQA questions in
3 folds of which only fold 0 is evaluated (fitted on 48 training questions with 12 for validation, scored on the
30 test questions 0-29; with fewer training questions FLORAIN barely moves the scores, so a broken FLORAIN would
go unnoticed), methods none / ITI / FLORAIN (300 epochs instead of 1,000 to keep it short), task
``truthfulqa`` (MC1/MC2, greedy generation judged by the embedded judge, the answers' fluency under the
unintervened model, CE/KL on 20 windows of the offline RTP texts) — from scratch (fresh run directories and a fresh activation cache, so capture is exercised too), compares every score with ``results/regress/reference.json`` and fails when one moves by more than its
tolerance in *either* direction (two-sided: ``WORSE`` and ``BETTER`` both fail, since an unexplained gain can be a
leak, e.g. test data reaching a fit; the report says which way, lower being better for CE/KL), a score is missing,
a method fails to run, or a method that changed the scores in the reference now leaves every score equal to the
unintervened model's (its edit is no longer applied: ``NO EFFECT``, whichever direction its effect had). ``none``
fits nothing and decodes greedily, so it is held to float noise only (:data:`EXACT_TOLERANCE`); the fitted
methods to the per-metric :data:`TOLERANCES`.
``bench regress --update`` (``make regress-update``) rewrites the reference; nothing updates it automatically: run
it only for an intended change, after checking the differences.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench.metrics import higher_is_better, label
from bench.paths import repo_root
from bench.report import markdown_table
from bench.runs import environment, now_iso, write_json

REFERENCE_FILE = repo_root() / "results" / "regress" / "reference.json"
OUTPUT_DIR = repo_root() / "results" / "regress" / "latest"

#: Largest tolerated change per metric of a fitted method, either way (absolute, in the metric's units), and why.
TOLERANCES = {"mc1": 0.04, "mc2": 0.02, "true": 0.07, "info": 0.07, "true_info_product": 0.07, "ce": 0.05,
              "kl": 0.05, "answer_nll": 0.1, "empty_share": 0.07}
#: Tolerance of every score of a method without a fit (``none``): float noise only.
EXACT_TOLERANCE = 1e-4
#: Methods held to :data:`EXACT_TOLERANCE` instead of :data:`TOLERANCES`.
METHOD_TOLERANCES = {"none": EXACT_TOLERANCE}
TOLERANCE_NOTES = (
    "Two-sided: a score that moves beyond its tolerance either way fails (WORSE or BETTER; an unexplained gain "
    "can be a leak). The benchmark is deterministic (fixed seed, CPU float32, no sampling), so on unchanged code "
    "the scores repeat up to float noise from thread counts and library versions. 'none' fits nothing and decodes "
    "greedily, so that noise is all it can show: a different thread count reorders float32 reductions (relative "
    "differences about 1e-7 per logit, about 1e-6 in CE, MC2 and the answers' NLL, which are means over many "
    "tokens or questions), and KL is exactly 0 (no hook). Its tolerance, 1e-4 on every metric, is far above that "
    "noise and far below one question of 30 (0.033), so its counts (MC1, True, Info, empty answers) must match "
    "exactly; only a near-tie in a greedy step or an MC comparison, or a library upgrade that changes kernels, "
    "could move it, and such a change is checked and recorded with `make regress-update`. Fitted methods "
    "(probes, 300 Adam epochs) can amplify that noise, so their tolerances absorb it and small legitimate "
    "changes while staying well below one standard error of the 30 scored questions, so a real change "
    "shows. MC1 and True/Info are shares of 30 questions (one question = 0.033): MC1 tolerates one flipped "
    "question (0.04; its s.e. is about 0.08), True, Info and True*Info two (0.07; s.e. about 0.09). MC2 is a "
    "mean of per-question probabilities (s.e. about 0.03; tolerance 0.02). CE and KL (nats/token, lower is "
    "better) tolerate 0.05. The answers' NLL under the unintervened model (nats/token, lower is better; s.e. "
    "0.06-0.19 here) tolerates 0.1 (about 10 % in perplexity), the share of empty answers two questions (0.07)."
)
UPDATE_HINT = ("if the change is intended (a fix, a new default, a library upgrade), check the differences and "
               "rewrite the reference with `make regress-update`; otherwise find the cause (a better score is no "
               "excuse: it can be a leak)")


@dataclass
class RegressConfig:
    """The fixed benchmark; recorded in the reference file, which is only valid for the same configuration."""

    model: str = "smollm2-135m"
    limit: int = 90
    folds: int = 3
    eval_folds: list[int] = field(default_factory=lambda: [0])
    seed: int = 42
    task: str = "truthfulqa"
    layer: int | None = None  # None: the model's registry layer (smollm2-135m: 16)
    methods: dict[str, dict] = field(default_factory=lambda: {"none": {}, "iti": {}, "florain": {"epochs": 300}})
    metrics: list[str] = field(default_factory=lambda: ["mc1", "mc2", "true", "info", "true_info_product", "ce",
                                                        "kl", "answer_nll", "empty_share"])
    judge: str = "embedded"
    max_new_tokens: int = 50
    kl_windows: int = 20
    kl_length: int = 128
    kl_source: str = "nontoxic"


DEFAULT = RegressConfig()


def run_benchmark(cfg: RegressConfig, output: Path = OUTPUT_DIR, data_dir: str | None = None,
                  echo: Callable[[str], None] = print) -> dict:
    """Run every method from scratch into ``output/<method>/``; a method that raises is recorded, not fatal."""
    output = Path(output)
    t0 = time.perf_counter()
    scores, errors, seconds = {}, {}, {}
    cache = output / ".activations"  # fresh: a cached capture must not hide a broken one
    shutil.rmtree(cache, ignore_errors=True)
    saved = os.environ.get("BENCH_ACTIVATION_CACHE")
    os.environ["BENCH_ACTIVATION_CACHE"] = str(cache)
    try:
        _run_methods(cfg, output, data_dir, echo, scores, errors, seconds)
    finally:
        if saved is None:
            os.environ.pop("BENCH_ACTIVATION_CACHE", None)
        else:
            os.environ["BENCH_ACTIVATION_CACHE"] = saved
        shutil.rmtree(cache, ignore_errors=True)
    env = environment("cpu")
    return {"created": now_iso(), "config": asdict(cfg), "scores": scores, "errors": errors,
            "effects": effects_vs_none(scores),
            "seconds": seconds, "wall_s": round(time.perf_counter() - t0, 1),
            "environment": {"git": env["git"], "packages": env["packages"], "cpu_count": env["cpu_count"]}}


def _run_methods(cfg: RegressConfig, output: Path, data_dir: str | None, echo: Callable[[str], None],
                 scores: dict, errors: dict, seconds: dict) -> None:
    from bench.runner import RunConfig, run, settings_read
    from bench.tasks import get_task

    for method, options in cfg.methods.items():
        out = output / method
        if out.exists():
            shutil.rmtree(out)  # always from scratch: the check is of the code, not of cached runs
        task_settings = {k: v for k, v in {"judge": cfg.judge, "kl_windows": cfg.kl_windows,
                                           "kl_length": cfg.kl_length, "kl_source": cfg.kl_source}.items()
                         if k in settings_read(get_task(cfg.task))}  # a task refuses settings it does not read
        rc = RunConfig(method=method, model=cfg.model, task=cfg.task, layer=cfg.layer, folds=cfg.folds,
                       seed=cfg.seed, limit=cfg.limit, options=dict(options), max_new_tokens=cfg.max_new_tokens,
                       eval_folds=list(cfg.eval_folds), **task_settings,
                       compile=False)  # the reference's fits ran without torch.compile
        echo(f"[regress] {method}")
        t = time.perf_counter()
        try:
            res = run(rc, out, data_dir, echo=echo)
        except Exception as err:  # noqa: BLE001 - a method that stops running is a regression to report
            errors[method] = f"{type(err).__name__}: {err}"
            echo(f"[regress] {method} FAILED: {errors[method]}\n{traceback.format_exc(limit=3)}")
            continue
        finally:
            seconds[method] = round(time.perf_counter() - t, 1)
        scores[method] = {m: {k: res["metrics"][m][k] for k in ("mean", "se", "n")}
                          for m in cfg.metrics if m in res["metrics"]}


def effects_vs_none(scores: dict) -> dict[str, float]:
    """Per method, the largest absolute difference of a mean score from the unintervened model's (``none``)."""
    base = scores.get("none")
    if base is None:
        return {}
    return {m: max((abs(s[k]["mean"] - base[k]["mean"]) for k in s if k in base), default=0.0)
            for m, s in scores.items() if m != "none"}


#: A method "has an effect" when some mean score moves by more than this from none's; "none" below NO_EFFECT.
EFFECT, NO_EFFECT = 1e-6, 1e-12
EFFECT_METRIC = "effect vs none (largest abs. difference)"


def make_reference(current: dict, tolerances: dict | None = None) -> dict:
    """A reference file's content from a benchmark result (refused when a method failed)."""
    if current["errors"]:
        raise ValueError("cannot make a reference from a run where methods failed: "
                         + "; ".join(f"{m}: {e}" for m, e in current["errors"].items()))
    tol = dict(tolerances or TOLERANCES)
    return {**current, "tolerances": {m: tol[m] for m in current["config"]["metrics"] if m in tol},
            "method_tolerances": dict(METHOD_TOLERANCES), "tolerance_notes": TOLERANCE_NOTES,
            "how_to_update": "make regress-update (bench regress --update), after checking that a change is intended"}


#: Statuses that fail the check: a score moved beyond its tolerance either way (WORSE, BETTER), or is missing, ...
FAILING = ("WORSE", "BETTER", "MISSING", "FAILED", "NO EFFECT")


@dataclass
class Row:
    """One (method, metric) comparison."""

    method: str
    metric: str
    reference: float
    current: float
    tolerance: float
    status: str  # ok | WORSE | BETTER | MISSING | FAILED | NO EFFECT (all but ok fail)

    @property
    def difference(self) -> float:
        return self.current - self.reference


def tolerance(reference: dict, method: str, metric: str) -> float:
    """The tolerance of one score: the method's own (``none``: float noise) if it has one, else the metric's.

    A reference written before per-method tolerances existed gets :data:`METHOD_TOLERANCES`."""
    per_method = reference.get("method_tolerances", METHOD_TOLERANCES)
    if method in per_method:
        return float(per_method[method])
    return float(reference["tolerances"].get(metric, 0.0))


def status_of(metric: str, reference: float, current: float, tol: float) -> str:
    """``ok`` within ``tol`` of the reference, else ``WORSE`` or ``BETTER`` (by the metric's direction); both fail."""
    gain = (current - reference) * (1 if higher_is_better(metric) else -1)
    return "WORSE" if gain < -tol - 1e-12 else "BETTER" if gain > tol + 1e-12 else "ok"


def compare(reference: dict, current: dict) -> tuple[bool, list[Row], list[str]]:
    """``(passed, rows, problems)``: every reference score against the current one, two-sided (a move beyond the
    tolerance fails either way; the status says which way)."""
    problems = []
    if reference["config"] != current["config"]:
        diff = sorted(k for k in set(reference["config"]) | set(current["config"])
                      if reference["config"].get(k) != current["config"].get(k))
        problems.append(f"the benchmark configuration differs from the reference's ({', '.join(diff)}); "
                        "update the reference on purpose with `make regress-update`")
    rows = []
    nan = float("nan")
    for method, ref_scores in reference["scores"].items():
        for metric, ref in ref_scores.items():
            tol = tolerance(reference, method, metric)
            if method in current["errors"]:
                rows.append(Row(method, metric, ref["mean"], nan, tol, "FAILED"))
                continue
            cur = current["scores"].get(method, {}).get(metric)
            if cur is None or not math.isfinite(cur["mean"]):
                rows.append(Row(method, metric, ref["mean"], nan, tol, "MISSING"))
                continue
            rows.append(Row(method, metric, ref["mean"], cur["mean"], tol,
                            status_of(metric, ref["mean"], cur["mean"], tol)))
    for method, ref_effect in reference.get("effects", {}).items():
        effect = current.get("effects", {}).get(method)
        if ref_effect > EFFECT and effect is not None and effect <= NO_EFFECT and method not in current["errors"]:
            rows.append(Row(method, EFFECT_METRIC, ref_effect, effect, 0.0, "NO EFFECT"))
            problems.append(f"{method} no longer changes any score relative to none (largest difference {effect:g}, "
                            f"{ref_effect:.4f} in the reference): is its intervention still applied?")
    for method, err in current["errors"].items():
        problems.append(f"{method} failed to run: {err}")
    moved = [f"{r.method} {r.metric} ({r.status.lower()})" for r in rows if r.status in ("WORSE", "BETTER")]
    if moved:
        problems.append(f"{len(moved)} score(s) moved beyond their tolerance: {', '.join(moved)}; {UPDATE_HINT}")
    bad = [r for r in rows if r.status in FAILING]
    return not bad and not problems, rows, problems


def render(rows: list[Row], problems: list[str] | None = None) -> str:
    """Markdown table of differences (current − reference) with each tolerance and verdict."""

    def num(x: float) -> str:
        return "–" if not math.isfinite(x) else f"{x:.4f}"

    def better(metric: str) -> str:
        return "> 0" if metric == EFFECT_METRIC else "higher" if higher_is_better(metric) else "lower"

    body = [[r.method, label(r.metric), better(r.metric), num(r.reference),
             num(r.current), "–" if not math.isfinite(r.current) else f"{r.difference:+.4f}", f"{r.tolerance:g}",
             r.status] for r in rows]
    text = markdown_table(["method", "metric", "better", "reference", "current", "difference", "tolerance", "status"],
                          body)
    if problems:
        text += "\n\n" + "\n".join(f"- {p}" for p in problems)
    return text


def load_reference(path: Path = REFERENCE_FILE) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no regression reference at {path}: create it with `make regress-update`")
    ref = json.loads(path.read_text())
    if not {"config", "scores", "tolerances"} <= set(ref):
        raise ValueError(f"{path} is not a regression reference (needs config, scores, tolerances)")
    return ref


def check(cfg: RegressConfig = DEFAULT, reference_file: Path = REFERENCE_FILE, output: Path = OUTPUT_DIR,
          data_dir: str | None = None, update: bool = False,
          echo: Callable[[str], None] = print) -> tuple[bool, str]:
    """Run the benchmark and compare (or, with ``update``, rewrite the reference). Returns (passed, report)."""
    reference = None if update else load_reference(reference_file)  # fail before minutes of running
    current = run_benchmark(cfg, output, data_dir, echo)
    write_json(Path(output) / "current.json", current)
    if update:
        ref = make_reference(current)
        write_json(Path(reference_file), ref)
        rows = [Row(m, k, v["mean"], v["mean"], tolerance(ref, m, k), "ok")
                for m, s in ref["scores"].items() for k, v in s.items()]
        report = render(rows) + f"\n\nreference written to {reference_file} (benchmark {current['wall_s']:.0f} s)"
        return True, report
    passed, rows, problems = compare(reference, current)
    report = render(rows, problems)
    report += f"\n\n{'PASSED' if passed else 'FAILED'}: {sum(r.status == 'ok' for r in rows)} ok, " \
              f"{sum(r.status == 'WORSE' for r in rows)} worse, {sum(r.status == 'BETTER' for r in rows)} better " \
              f"(both fail), {sum(r.status in FAILING[2:] for r in rows)} missing/failed/without effect " \
              f"(benchmark {current['wall_s']:.0f} s; reference of {reference.get('created', '?')})"
    ref_pkgs = reference.get("environment", {}).get("packages")
    if not passed and ref_pkgs and ref_pkgs != current["environment"]["packages"]:
        report += f"\npackage versions differ from the reference's ({ref_pkgs}): float-level changes are expected"
    (Path(output) / "diff.md").write_text(report + "\n")
    return passed, report
