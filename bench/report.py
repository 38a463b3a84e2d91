"""Markdown tables of results."""

from __future__ import annotations

import math

from bench.metrics import label, ordered


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
                     *[fmt(r["metrics"][m]) for m in metrics], str(len(r["folds"])), str(r["metrics"][metrics[0]]["n"])])
    return markdown_table(header, rows)
