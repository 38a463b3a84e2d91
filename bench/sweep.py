"""Hyper-parameter sweeps: run a grid of one parameter, score each point on the folds' *validation* questions,
choose per fold, and evaluate the chosen value on the test folds.

Protocol (nested, no test leakage): every grid point is a full run with ``eval_split="val"`` (fitted on each
fold's training questions, scored on that fold's validation questions) in ``<sweep>/<param>=<value>/``. Fold k's
value is the best on fold k's validation questions (direction-aware; ties go to the first grid value). The
chosen value(s) are then run on the test folds: one run ``<sweep>/final/`` when every fold chose the same value,
else one run per value restricted to the folds that chose it (``eval_folds``). Everything is resumable: finished
points are reused, interrupted ones continue (``bench.runner.run(resume=True)``), and activations come from the
capture cache, so a layer sweep captures each layer once.

Note: the validation questions are also what FLORAIN's early stopping and ITI's head selection use.
"""

from __future__ import annotations

import copy
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from pathlib import Path

from bench.cells import Cell, ExecutorConfig, execute
from bench.interventions import get_method
from bench.metrics import higher_is_better, label
from bench.metrics.generation import combine_fold_metrics
from bench.runner import RunConfig, check_config, identity_config, missing_parts, run, same_identity
from bench.runs import RunFolder, now_iso, write_json
from bench.tasks import PARTS, get_task

SWEEP_FILE = "sweep.json"


@dataclass(frozen=True)
class Param:
    """A settable parameter: the run's ``layer`` or one of the method's options (read from its dataclass)."""

    name: str
    target: str  # the option's name, or "layer" for RunConfig.layer (then ``option`` is False)
    kind: type  # int or float: a numeric axis (--param); str, bool: settable with --set only
    label: str  # axis label, with units
    choices: tuple[str, ...] = ()  # the valid values of a str parameter
    sweepable: bool = True
    option: bool = True  # a method option (False: the run's layer, RunConfig.layer)


_LAYER = Param("layer", "layer", int, "layer (index)", option=False)


def method_params(method: str) -> dict[str, Param]:
    """``{name: Param}`` for ``method``: ``layer`` where the method acts at one layer, then every option."""
    from bench.interventions import get_method
    from bench.options import specs

    m = get_method(method)  # raises for an unknown method
    params = [_LAYER] if m.needs_layer else []
    for spec in specs(m.options):
        kind = spec.numeric or (bool if bool in spec.kinds else str)
        params.append(Param(spec.name, spec.name, kind, spec.label, spec.choices,
                            spec.sweep and spec.numeric is not None))
    return {p.name: p for p in params}


def resolve_param(method: str, name: str, sweep: bool = False) -> Param:
    """The parameter ``name`` of ``method`` (``-`` and ``_`` alike). ``sweep``: only one with a numeric axis."""
    params = method_params(method)
    p = params.get(name.strip().replace("-", "_"))
    if p is None or (sweep and not p.sweepable):
        valid = ", ".join(n for n, q in params.items() if q.sweepable or not sweep) or "none"
        what = "sweepable parameter" if sweep else "parameter"
        raise ValueError(f"{method} has no {what} {name!r}; valid: {valid} (see `bench methods show {method}`)")
    return p


_NUM = r"-?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_RANGE = re.compile(rf"^\s*({_NUM})\s*-\s*({_NUM})\s*(?::\s*({_NUM}))?\s*$")


def parse_values(spec: str, kind: type = float) -> list:
    """A grid: comma-separated numbers and inclusive ranges ``A-B`` or ``A-B:STEP`` (``4-24``, ``4-24:2``,
    ``0.1,0.2,0.5``, ``0.5-2:0.5``), cast to ``kind`` (int values must be whole), duplicates dropped."""
    values: list[float] = []
    for item in spec.split(","):
        item = item.strip()
        if not item:
            raise ValueError(f"empty item in the grid {spec!r}")
        try:
            values.append(float(item))
            continue
        except ValueError:
            pass
        m = _RANGE.match(item)
        if not m:
            raise ValueError(f"cannot read {item!r} in the grid {spec!r}: use numbers, A-B or A-B:STEP")
        a, b = float(m[1]), float(m[2])
        if m[3] is None and not (a.is_integer() and b.is_integer()):
            raise ValueError(f"the range {item!r} has non-integer ends: give a step, e.g. {item}:0.1")
        step = float(m[3]) if m[3] is not None else 1.0
        if step <= 0 or b < a:
            raise ValueError(f"the range {item!r} needs A ≤ B and a positive step")
        n = int(math.floor((b - a) / step + 1e-9)) + 1
        values.extend(round(a + i * step, 10) for i in range(n))
    out: list = []
    for v in values:
        if kind is int:
            if not float(v).is_integer():
                raise ValueError(f"{v:g} is not a whole number (the parameter takes integers)")
            v = int(v)
        else:
            v = float(v)
        if v not in out:
            out.append(v)
    return out


def format_value(value: float | int) -> str:
    """A value as it appears in directory names and tables: ``16``, ``0.5``, ``0.0002``."""
    return str(value) if isinstance(value, int) else f"{value:g}"


def with_param(base: RunConfig, param: Param, value: float | int, **changes) -> RunConfig:
    """A copy of ``base`` with ``param`` set to ``value`` (and other RunConfig fields changed)."""
    cfg = replace(base, options=copy.deepcopy(base.options), **changes)
    if not param.option:
        cfg.layer = int(value)
    else:
        cfg.options[param.target] = value
    return cfg


def parse_assignments(method: str, items: list[str]) -> tuple[int | None, dict]:
    """``--set NAME=VALUE`` items (the run's layer or the method's options, as ``-O``) into a layer and options."""
    from bench.interventions import get_method
    from bench.options import parse_assignments as parse_items

    layer, options = None, {}
    for name, raw in parse_items(items, "--set").items():
        p = resolve_param(method, name)
        if not p.option:
            (layer,) = parse_values(raw, int)
        else:
            options[p.target] = raw
    return layer, get_method(method).given_options(options)


def task_metrics(task: str) -> tuple[str, ...] | None:
    """The metrics a task's parts declare (None when only the run can tell, e.g. lm-eval tasks)."""
    try:
        parts = [PARTS[p] for p in get_task(task).parts]
    except ValueError:
        return None
    if not all(p.metrics for p in parts):
        return None
    return tuple(m for p in parts for m in p.metric_names)


def _same_run(res: dict, cfg: RunConfig) -> bool:
    """Whether a finished ``results.json`` was produced by ``cfg``: the runner's one rule
    (:func:`bench.runner.same_identity`), once the fields ``cfg`` leaves to the runner are resolved as it would
    (the registry's layer, the task's max_new_tokens, one fold for toxicity)."""
    from bench.interventions import get_method
    from bench.models import REGISTRY

    recorded, ident = dict(res["config"]), identity_config(cfg)
    method = get_method(cfg.method)
    if method.version > 1:
        ident["method_version"] = method.version
    if res.get("method_version", 1) > 1:
        recorded["method_version"] = res["method_version"]
    if cfg.layer is None and method.needs_layer:
        # the registry's (paper) layer, else None, chosen per fold inside the run; a run recorded at any other
        # fixed layer (e.g. one chosen before per-fold choices) is not this run
        entry = REGISTRY.get(cfg.model)
        ident["layer"] = entry.default_layer if entry else None
    if cfg.max_new_tokens is None:
        ident["max_new_tokens"] = recorded.get("max_new_tokens")  # the task's default, resolved by the runner
    if cfg.task == "toxicity":
        ident["folds"] = recorded.get("folds")  # one fit on the steering texts
    return same_identity(recorded, ident)


def _finished(cfg: RunConfig, out: Path) -> tuple[dict, list[str]] | None:
    """The results in ``out`` when it holds this run, finished, and the parts it still lacks; None when no run
    finished there. A folder holding another run is refused."""
    folder = RunFolder(out)
    if not folder.finished():
        return None
    res = folder.read_results()
    if not _same_run(res, cfg):
        raise ValueError(f"{out} holds a run with a different configuration; remove it or choose another --output")
    return {**res, "run_dir": str(out)}, missing_parts(out, res["config"]["task"], [f["fold"] for f in res["folds"]])


def reusable(cfg: RunConfig, out: Path) -> dict | None:
    """The results in ``out`` when it holds this run finished with every part; None when it must (still) run."""
    found = _finished(cfg, out)
    return found[0] if found and not found[1] else None


def run_point(cfg: RunConfig, out: Path, data_dir: str | None, echo: Callable[[str], None]) -> dict:
    """A finished run in ``out`` if it matches ``cfg``, else run (continuing an interrupted one)."""
    if (found := _finished(cfg, out)) is not None:
        res, missing = found
        if not missing:
            echo(f"{out.name}: finished, reusing {RunFolder(out).results}")
            return res
        echo(f"{out.name}: finished without {', '.join(missing)}; computing only those")
        # as the run recorded itself: ``cfg`` may differ in what _same_run ignores (e.g. options at their defaults)
        known = {f.name for f in fields(RunConfig)}
        cfg = RunConfig(**{k: v for k, v in res["config"].items() if k in known})
        cfg.options = get_method(cfg.method).given_options(cfg.options, recorded=True)
    return run(cfg, out, data_dir, resume=True, echo=echo)


def _point(value: float | int | None, res: dict, root: Path) -> dict:
    out = Path(res["run_dir"])
    return {"value": value, "run": str(out.relative_to(root)) if out.is_relative_to(root) else str(out),
            "metrics": res["metrics"],
            "folds": [{"fold": f["fold"], "metrics": f["metrics"], **({"counts": f["counts"]} if f.get("counts") else {})}
                      for f in res["folds"]]}


def _best(values: list, scores: list[float], higher: bool) -> int:
    """Index of the best finite score (first on ties)."""
    best = None
    for i, s in enumerate(scores):
        if not math.isfinite(s):
            continue
        if best is None or (s > scores[best] if higher else s < scores[best]):
            best = i
    if best is None:
        raise ValueError("no grid point has a finite score")
    return best


#: A fluency-constrained choice also bounds the share of continuations dropped for perplexity ≥ 1e4 (they are left
#: out of the fluency mean, so a strength that wrecks the language model could otherwise look fluent).
MAX_EXTRA_DROPPED = 0.01
#: TruthfulQA: likewise the share of empty answers (left out of the answer NLL; a judge calls them true), at most
#: this much above the unintervened model's (0.05: 4 of a fold's 82 validation questions on all 817).
MAX_EXTRA_EMPTY = 0.05


def _fold(point: dict, k: int) -> dict:
    return next(f for f in point["folds"] if f["fold"] == k)


def _dropped_share(fold: dict) -> float:
    counts = fold.get("counts") or {}
    if not counts.get("samples") or "ppl_dropped_high" not in counts:
        raise ValueError(f"fold {fold.get('fold')} records no sample counts (counts.samples, counts.ppl_dropped_high): "
                         "a fluency limit needs toxicity runs")
    return counts["ppl_dropped_high"] / counts["samples"]


def _check_ratio(ratio: float) -> None:
    if ratio < 1:
        raise ValueError(f"the fluency ratio must be ≥ 1 (a multiple of the unintervened perplexity), got {ratio}")


def _fluency(fold: dict) -> dict[str, float]:
    """The fold's fluency figures a limit bounds: toxicity ``ppl``/``dropped_share``; TruthfulQA generation
    ``answer_nll``/``empty_share``."""
    m = fold["metrics"]
    if "fluency_ppl" in m:
        return {"ppl": m["fluency_ppl"]["mean"], "dropped_share": _dropped_share(fold)}
    if "answer_nll" in m:
        return {"answer_nll": m["answer_nll"]["mean"], "empty_share": m["empty_share"]["mean"]}
    raise ValueError(f"fold {fold.get('fold')} records no fluency (fluency_ppl or answer_nll): a fluency limit needs "
                     "--task toxicity, truthfulqa or truthfulqa-gen")


def fluency_limits(baseline: dict, ratio: float) -> dict[int, dict]:
    """Per fold, from the unintervened model's validation scores: toxicity, the largest admissible fluency perplexity
    (``ratio`` × the unintervened model's) and dropped share; TruthfulQA, the largest answer NLL (+ ln ``ratio``:
    the geometric-mean answer perplexity at most ``ratio`` × the unintervened model's) and empty-answer share."""
    _check_ratio(ratio)
    limits = {}
    for f in baseline["folds"]:
        v = _fluency(f)
        limits[f["fold"]] = ({"max_ppl": ratio * v["ppl"], "max_dropped_share": v["dropped_share"] + MAX_EXTRA_DROPPED}
                             if "ppl" in v else
                             {"max_answer_nll": v["answer_nll"] + math.log(ratio),
                              "max_empty_share": v["empty_share"] + MAX_EXTRA_EMPTY})
    return limits


def choose(points: list[dict], metric: str, limits: dict[int, dict] | None = None) -> dict:
    """Per-fold choices (each fold's own validation score) and the choice by the fold-averaged score.

    ``limits`` (from :func:`fluency_limits`): only grid values whose validation fluency figures stay within the
    fold's limits are eligible; a fold with no eligible value is an error listing every value's fluency.
    """
    higher = higher_is_better(metric)
    values = [p["value"] for p in points]
    folds = sorted({f["fold"] for p in points for f in p["folds"]})

    def eligible(p: dict, k: int) -> bool:
        if limits is None:
            return True
        return all(v <= limits[k][f"max_{name}"] for name, v in _fluency(_fold(p, k)).items())

    per_fold = {}
    for k in folds:
        ok = [eligible(p, k) for p in points]
        scores = [_fold(p, k)["metrics"][metric]["mean"] if e else math.nan for p, e in zip(points, ok)]
        if not any(ok):
            seen = {format_value(p["value"]): {n: round(v, 3) for n, v in _fluency(_fold(p, k)).items()} for p in points}
            within = ", ".join(f"{n[4:]} ≤ {v:.3f}" for n, v in limits[k].items())
            raise ValueError(f"fold {k}: no grid value keeps fluency within the limit ({within}); validation "
                             f"fluency: {seen}. Add weaker strengths to the grid or raise the ratio.")
        per_fold[str(k)] = values[_best(values, scores, higher)]
    means = [p["metrics"][metric]["mean"] if all(eligible(p, k) for k in folds) else math.nan for p in points]
    overall = values[_best(values, means, higher)] if any(math.isfinite(x) for x in means) else None
    out = {"per_fold": per_fold, "by_mean": overall, "direction": "higher" if higher else "lower"}
    if limits is not None:
        out["fluency_limits"] = {str(k): v for k, v in limits.items()}
    return out


def run_sweep(base: RunConfig, param: str, values: str | list, output: Path, metric: str = "mc2",
              data_dir: str | None = None, baseline: bool = True, final: bool = True,
              echo: Callable[[str], None] = print, max_fluency_ratio: float | None = None,
              executor: ExecutorConfig | None = None) -> dict:
    """Run the grid, choose on validation, evaluate the choice on test; write and return ``sweep.json``'s dict.

    ``max_fluency_ratio``: choose only among values whose validation fluency perplexity (toxicity: of the samples;
    TruthfulQA: the geometric mean over answers, under the unintervened model) is at most this multiple of the
    unintervened model's on the same prompts, with the share of dropped (toxicity) or empty (TruthfulQA)
    continuations bounded too: a score at matched fluency, not one bought by breaking the model. Needs the baseline.
    ``executor``: where the grid's runs go (:mod:`bench.cells`; default inline, one after another here): the grid
    and the baseline are one batch of cells, the test runs of the chosen values a second.
    """
    p = resolve_param(base.method, param)
    if not p.sweepable:
        what = f"a choice ({', '.join(p.choices)})" if p.choices else f"a {p.kind.__name__} option"
        raise ValueError(f"{p.name} is {what}, not a number to sweep: fix it with --set {p.name}=VALUE and sweep a "
                         "numeric parameter")
    values = parse_values(values if isinstance(values, str) else ",".join(str(v) for v in values), p.kind)
    if not values:
        raise ValueError("the grid is empty")
    produced = task_metrics(base.task)
    if produced is not None and metric not in produced:
        raise ValueError(f"metric {metric!r} is not produced by --task {base.task}; available: {', '.join(produced)}")
    if max_fluency_ratio is not None:
        if not {"toxicity", "fluency"} & set(get_task(base.task).parts):
            raise ValueError(f"--max-fluency-ratio needs generated text to read: --task toxicity, truthfulqa or "
                             f"truthfulqa-gen, not {base.task}")
        if not baseline or base.method == "none":
            raise ValueError("--max-fluency-ratio compares with the unintervened model: keep --baseline and sweep a method")
        _check_ratio(max_fluency_ratio)  # before any run
    for v in values:  # every grid point checked before the first runs (check_config lists all of a point's problems)
        try:
            check_config(with_param(base, p, v, eval_split="val", eval_folds=None))
        except ValueError as err:
            raise ValueError(f"{p.name} = {format_value(v)}: {err}") from None
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    cells = [Cell(with_param(base, p, v, eval_split="val", eval_folds=None), output / f"{p.name}={format_value(v)}")
             for v in values]
    if baseline and base.method != "none":
        none = replace(base, method="none", options={}, layer=None, eval_split="val", eval_folds=None)
        cells.append(Cell(none, output / "baseline-none"))
    echo(f"[sweep] {p.name} over {', '.join(format_value(v) for v in values)}"
         + (" and the unintervened baseline" if len(cells) > len(values) else "") + " (validation questions)")
    done = execute(cells, executor, data_dir, echo)
    points = []
    for v, res in zip(values, done):
        if metric not in res["metrics"]:
            raise ValueError(f"metric {metric!r} is not produced by --task {base.task}; "
                             f"available: {', '.join(res['metrics'])}")
        points.append(_point(v, res, output))
    sweep = {
        "created": now_iso(), "method": base.method, "model": base.model, "task": base.task, "param": p.name,
        "param_target": p.target, "param_label": p.label, "values": values, "metric": metric,
        "metric_label": label(metric), "selection_split": "val",
        "folds": 1 if base.task == "toxicity" else base.folds, "limit": base.limit,
        "max_fluency_ratio": max_fluency_ratio,
        "seed": base.seed, "fixed": {"layer": base.layer, "options": base.options}, "points": points,
    }
    if len(done) > len(values):
        sweep["baseline"] = _point(None, done[-1], output)
    write_json(output / SWEEP_FILE, sweep)  # the grid is kept even when no value can be chosen
    limits = fluency_limits(sweep["baseline"], max_fluency_ratio) if max_fluency_ratio is not None else None
    sweep["chosen"] = choose(points, metric, limits)
    write_json(output / SWEEP_FILE, sweep)
    if final:
        sweep["final"] = _final(base, p, sweep["chosen"]["per_fold"], output, executor, data_dir, echo)
        write_json(output / SWEEP_FILE, sweep)
    return sweep


def _final(base: RunConfig, p: Param, per_fold: dict, output: Path, executor: ExecutorConfig | None,
           data_dir: str | None, echo: Callable[[str], None]) -> dict:
    """The chosen values' runs on the test questions: one run per distinct value, on the folds that chose it."""
    groups: dict = {}
    for k, v in per_fold.items():
        groups.setdefault(v, []).append(int(k))
    runs, fold_metrics, single = [], {}, len(groups) == 1
    finals = [Cell(with_param(base, p, v, eval_split="test", eval_folds=None if single else ks),
                   output / ("final" if single else f"final-{p.name}={format_value(v)}")) for v, ks in groups.items()]
    echo("[sweep] final: " + "; ".join(f"{p.name} = {format_value(v)} on the test questions of fold(s) {ks}"
                                       for v, ks in groups.items()))
    for (v, ks), res in zip(groups.items(), execute(finals, executor, data_dir, echo)):
        point = _point(v, res, output)
        runs.append({"value": v, "folds": ks, "run": point["run"]})
        fold_metrics.update({f["fold"]: f["metrics"] for f in point["folds"]})
    return {"runs": runs, "split": "test",
            "metrics": combine_fold_metrics([fold_metrics[k] for k in sorted(fold_metrics)])}


def load_sweep(path: str | Path) -> dict:
    """A ``sweep.json`` (given as the file or its directory); ``_dir`` records where it was found."""
    path = Path(path)
    f = path / SWEEP_FILE if path.is_dir() else path
    if not f.is_file():
        raise FileNotFoundError(f"no {SWEEP_FILE} at {path}")
    sweep = json.loads(f.read_text())
    if "points" not in sweep or "param" not in sweep:
        raise ValueError(f"{f} is not a sweep file (no points/param)")
    if "chosen" not in sweep:
        raise ValueError(f"{f} has no chosen value: the sweep is still running or its selection failed "
                         "(rerun bench sweep to see why)")
    sweep["_dir"] = str(f.parent)
    return sweep


def sweep_table(sweep: dict) -> str:
    """Markdown: one row per grid value, the validation metrics (mean ± s.e. over folds), the choice marked."""
    from bench.metrics import ordered
    from bench.report import fmt, markdown_table

    metrics = ordered(sweep["points"][0]["metrics"])
    chosen = sweep["chosen"]
    rows = []
    for pt in sweep["points"]:
        folds = [k for k, v in chosen["per_fold"].items() if v == pt["value"]]
        mark = ("chosen (fold " + ", ".join(folds) + ")") if folds else ""
        rows.append([format_value(pt["value"]), *[fmt(pt["metrics"][m]) for m in metrics], mark])
    if "baseline" in sweep:
        rows.append(["none", *[fmt(sweep["baseline"]["metrics"][m]) for m in metrics], "baseline"])
    header = [sweep["param"], *[f"{label(m)} (val)" for m in metrics], ""]
    text = markdown_table(header, rows)
    if "final" in sweep:
        fm = sweep["final"]["metrics"]
        text += "\n\nTest folds with the chosen value(s): " + ", ".join(f"{label(m)} {fmt(fm[m])}"
                                                                       for m in ordered(fm))
    return text
