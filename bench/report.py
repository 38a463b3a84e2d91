"""Markdown tables of results."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

from bench.metrics import label, ordered
from bench.runs import RunFolder, git_commit, now_iso, write_json, write_text


def fmt(metric: dict, digits: int = 3) -> str:
    """``mean ± se``; ``mean`` alone without a finite s.e.; "–" when there is no finite mean (nothing to score)."""
    mean, se = metric["mean"], metric.get("se", float("nan"))
    if mean is None or not math.isfinite(mean):
        return "–"
    return f"{mean:.{digits}f} ± {se:.{digits}f}" if math.isfinite(se) else f"{mean:.{digits}f}"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


#: metrics read by the judge → the judge aspects whose validated error they carry
JUDGED = {"true": ("truth",), "info": ("info",), "true_and_info": ("truth", "info"),
          "true_info_product": ("truth", "info")}
JUDGE_NOTE = ("judge err: share of human-labelled *model-written* answers (TruthfulQA's reference answers excluded) "
              "that the run's judge gets wrong, cross-validated ({protocol} protocol, `bench judge validate`); bias: "
              "its rate of 'true' (or 'informative') minus the raters'; κ and both protocols are in each run's "
              "results.json under judge.validation; n/a: a judge without that validation.")


def judge_error(result: dict, metric: str) -> str:
    """``judge err 0.17`` (or ``0.17/0.13`` for truth/info) for a judged metric of ``result``; "" otherwise."""
    aspects = JUDGED.get(metric)
    if not aspects:
        return ""
    validation = (result.get("judge") or {}).get("validation") or {}
    errs = [1.0 - validation[a]["accuracy"] for a in aspects if a in validation]
    if len(errs) != len(aspects):
        return "judge err n/a"
    bias = f", bias {validation[aspects[0]]['bias']:+.2f}" if len(aspects) == 1 and "bias" in validation[aspects[0]] else ""
    return "judge err " + "/".join(f"{e:.2f}" for e in errs) + bias


def run_layer(result: dict) -> str | None:
    """The run's layer: the configured one, else the folds' own choices (``"16/17"``), else None."""
    layer = result["config"].get("layer")
    if layer is not None:
        return str(layer)
    # the runner's per-fold choice, else the layer a method chose itself (e.g. CAA's validation sweep)
    per_fold = [f["layer"] if f.get("layer") is not None else (f.get("intervention_info") or {}).get("layer")
                for f in result.get("folds", [])]
    if any(x is not None for x in per_fold):
        return "/".join("?" if x is None else str(x) for x in per_fold)
    return None


def results_table(results: list[dict], metrics: tuple[str, ...] = ("mc1", "mc2", "mc3")) -> str:
    """One row per run (model, method, layer), mean ± standard error over folds."""
    metrics = tuple(ordered(metrics))
    header = ["model", "method", "layer", *[label(m) for m in metrics], "folds", "n"]
    rows = []
    for r in results:
        cfg = r["config"]
        layer = run_layer(r)
        rows.append([cfg["model"], cfg["method"], layer or "–",
                     *[fmt(r["metrics"][m]) + (f" ({j})" if (j := judge_error(r, m)) else "") for m in metrics],
                     str(len(r["folds"])), str(r["metrics"][metrics[0]]["n"])])
    table = markdown_table(header, rows)
    if any(judge_error(r, m) for r in results for m in metrics):
        protocols = {((r.get("judge") or {}).get("validation") or {}).get("protocol") for r in results} - {None}
        table += "\n\n" + JUDGE_NOTE.format(protocol="/".join(sorted(protocols)) or "–")
    return table


def save_revised_run(run_dir: str | Path, results: dict, per_question: list[dict], history: str, entry: dict) -> None:
    """Write a finished run whose numbers were revised from its saved outputs (re-judged, re-scored): ``entry``
    appended to ``results[history]``, then the per-question records, results.md and results.json (last) atomically."""
    folder = RunFolder(run_dir)
    results.setdefault(history, []).append({"date": now_iso(), "git": git_commit(), **entry})
    folder.write_per_question(per_question)
    write_text(folder.table, results_table([results], tuple(results["metrics"])) + "\n")
    write_json(folder.results, results)


def patch_fold_files(run_dir: Path, fold: int, part: str, metrics: dict,
                     patch_records: Callable[[list[dict], str], None]) -> None:
    """A revised run's git-ignored fold files, when present (``fold_K.<part>.json`` and ``fold_K.json``): the same
    metrics and records as ``results.json``, so that ``--resume`` reuses the revised numbers."""
    folder = RunFolder(run_dir)
    for path, key in ((folder.part(fold, part), "records"), (folder.fold(fold), "per_question")):
        if path.is_file():
            data = json.loads(path.read_text())
            data["metrics"].update(metrics)
            patch_records(data[key], str(path))
            write_json(path, data)
