"""Figures from sweep and results files (matplotlib, Agg backend): PNG and SVG, titles, units, legends.

* :func:`plot_sweep` — validation metric(s) against the swept parameter, mean ± s.e. over folds, the unintervened
  baseline dashed, the chosen value marked and the chosen value's test score beside it.
* :func:`plot_tradeoff` — True% against Info%, one panel per model, a point per method, with lines of equal
  True×Info and a dashed cross through the unintervened run.
* :func:`plot_toxicity_fluency` — expected maximum toxicity against conditional perplexity, one panel per model.

Every function takes data (dicts) and an output stem, and returns the files it wrote. Series carry SVG ids
(``series-<name>``), and SVG text stays text, so tests and readers can find them.
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
from matplotlib.transforms import Bbox  # noqa: E402

from bench.metrics import declared, higher_is_better, label, ordered, unit  # noqa: E402

plt.rcParams.update({"svg.fonttype": "none", "figure.dpi": 100, "axes.grid": True, "grid.alpha": 0.3})

def axis_label(metric: str) -> str:
    return f"{label(metric)} ({unit(metric)})"


def save(fig: plt.Figure, stem: Path) -> list[Path]:
    """Write ``stem.png`` (150 dpi) and ``stem.svg``; close the figure."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_suffix(".png"), stem.with_suffix(".svg")]
    fig.savefig(paths[0], dpi=150, bbox_inches="tight")
    fig.savefig(paths[1], bbox_inches="tight")
    plt.close(fig)
    return paths


def _se(m: dict) -> float:
    se = m.get("se", float("nan"))
    return se if se is not None and math.isfinite(se) else 0.0


def plot_sweep(sweep: dict, output: Path | None = None, metrics: list[str] | None = None) -> list[Path]:
    """Validation metric(s) vs the swept parameter; writes ``<output or sweep dir>/sweep-<param>.{png,svg}``."""
    points = sweep["points"]
    xs = [p["value"] for p in points]
    sel = sweep["metric"]
    available = set(points[0]["metrics"])
    meta = declared()
    wanted = metrics or [m for m in ordered(available) if m in meta and meta[m].sweep_plot]
    if sel not in wanted:
        wanted = [sel, *wanted]
    missing = [m for m in wanted if m not in available]
    if missing:
        raise ValueError(f"metric(s) {missing} not in the sweep; available: {', '.join(sorted(available))}")
    panels: dict[str, list[str]] = {}
    for m in ordered(wanted):
        panels.setdefault(unit(m), []).append(m)
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 3.6 * len(panels) + 0.6), sharex=True, squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    per_fold = sorted(set(sweep["chosen"]["per_fold"].values()), key=xs.index)
    for ax, (u, ms) in zip(axes[:, 0], panels.items()):
        for i, m in enumerate(ms):
            _sweep_series(ax, sweep, m, colours[i % len(colours)], per_fold)
        for v in per_fold:
            ax.axvline(v, color="grey", ls=":", lw=1.2)
        ax.set_ylabel(textwrap.fill(", ".join(label(m) for m in ms) + f" ({u})", 45))
        ax.legend(fontsize=7.5, loc="upper left", bbox_to_anchor=(1.01, 1.0), framealpha=0.9)
    ax = axes[-1, 0]
    ax.set_xlabel(sweep.get("param_label") or sweep["param"])
    positive = all(isinstance(x, (int, float)) and x > 0 for x in xs)
    if positive and len(xs) > 2 and max(xs) / min(xs) >= 30:
        ax.set_xscale("log")
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    if len(xs) <= 25:  # every grid value labelled as typed (also on a log axis)
        ax.set_xticks(xs, [f"{x:g}" for x in xs])
    fig.suptitle("\n".join(textwrap.fill(line, 120) for line in _sweep_title(sweep, per_fold)), fontsize=10)
    fig.tight_layout()
    stem = Path(output) if output else Path(sweep["_dir"])
    return save(fig, stem / f"sweep-{sweep['param']}")


def _sweep_series(ax, sweep: dict, m: str, c: str, per_fold: list) -> None:
    """One metric of a sweep: validation means ± s.e., the unintervened baseline, the fluency ceiling, the values
    chosen per fold (stars) and the test-fold score at a single chosen value (diamond)."""
    points, sel, chosen = sweep["points"], sweep["metric"], sweep["chosen"]
    xs = [p["value"] for p in points]
    ys = [p["metrics"][m]["mean"] for p in points]
    es = [_se(p["metrics"][m]) for p in points]
    cont = ax.errorbar(xs, ys, yerr=es, marker="o", ms=4, lw=2.2 if m == sel else 1.2, capsize=3, color=c,
                       label=f"{label(m)} (validation)" + (" — selection metric" if m == sel else ""))
    cont.lines[0].set_gid(f"series-{m}")
    if "baseline" in sweep and m in sweep["baseline"]["metrics"]:
        ax.axhline(sweep["baseline"]["metrics"][m]["mean"], ls="--", lw=1, color=c, alpha=0.8,
                   label=f"{label(m)}, none (unintervened)", gid=f"baseline-{m}")
    limits = chosen.get("fluency_limits") or {}
    if m == "answer_nll" and limits:  # the admissible ceiling (fold mean of the per-fold limits)
        ceiling = sum(lim["max_answer_nll"] for lim in limits.values()) / len(limits)
        ax.axhline(ceiling, ls=":", lw=1.5, color="black", gid="limit-answer_nll",
                   label=f"fluency limit ({sweep.get('max_fluency_ratio'):g}× unintervened perplexity)")
    if m == sel:
        for v in per_fold:
            folds = [k for k, cv in chosen["per_fold"].items() if cv == v]
            ax.plot([v], [points[xs.index(v)]["metrics"][m]["mean"]], marker="*", ms=16, color=c, mec="black",
                    ls="none", gid=f"chosen-{m}", label=f"chosen {sweep['param']} = {v:g} (fold {', '.join(folds)})")
    if "final" in sweep and m in sweep["final"]["metrics"] and len(per_fold) == 1:
        fm = sweep["final"]["metrics"][m]
        ax.errorbar([per_fold[0]], [fm["mean"]], yerr=[_se(fm)], marker="D", ms=7, capsize=4, color=c,
                    mec="black", ls="none", label=f"{label(m)} on the test folds (chosen value)", gid=f"test-{m}")


def _sweep_title(sweep: dict, per_fold: list) -> list[str]:
    """The sweep figure's title lines: what was swept, the selection rule, the test-fold score."""
    sel, chosen = sweep["metric"], sweep["chosen"]
    n = sweep["points"][0]["metrics"][sel].get("n")
    direction = "higher" if higher_is_better(sel) else "lower"
    test = ""
    if "final" in sweep and sel in sweep["final"]["metrics"]:
        fm = sweep["final"]["metrics"][sel]
        test = (f"\ntest folds with the chosen value{'s' if len(per_fold) > 1 else ''}: {label(sel)} "
                f"{fm['mean']:.3f} ± {_se(fm):.3f} ({fm.get('n')} questions)")
    if sweep.get("task") == "toxicity":
        test = test.replace("test folds", "test prompts").replace("questions)", "prompts)")
        limit = chosen.get("fluency_limits", {}).get("0")
        rule = (f"least {label(sel)} with fluency PPL ≤ {limit['max_ppl']:.0f} ({sweep.get('max_fluency_ratio'):g}× "
                f"unintervened)" if limit else f"{label(sel)} ({direction} is better)")
        setup = f"{n} validation prompts (disjoint from the test prompts); chosen by {rule}"
    else:
        from bench.sweep import MAX_EXTRA_EMPTY

        limit = chosen.get("fluency_limits")
        rule = (f"{label(sel)} ({direction} is better) among values with answer perplexity ≤ "
                f"{sweep.get('max_fluency_ratio'):g}× unintervened and ≤ {MAX_EXTRA_EMPTY:g} more empty answers"
                if limit else f"{label(sel)} ({direction} is better)")
        setup = f"{sweep.get('folds', '?')}-fold CV, {n} validation questions in all; chosen per fold by {rule}"
    return [f"{sweep['method']} on {sweep['model']}: validation scores vs {sweep['param']}",
            f"{setup}; bars: ± 1 s.e.", *test.strip().splitlines()]


def _colours(results: list[dict]) -> dict[str, str]:
    """One colour per method, the same in every panel and figure built from these results."""
    methods = sorted({r["config"]["method"] for r in results})
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return {m: colours[i % len(colours)] for i, m in enumerate(methods)}


def _scatter(results: list[dict], x: str, y: str, scale: float, ax: plt.Axes,
             colour: dict[str, str] | None = None) -> int:
    """One point per run with both metrics, ± 1 s.e. bars, labelled by method; returns the count.

    Points of the unintervened run (method ``none``) also get a dashed cross through them, so that every other
    point reads as better or worse than it on each axis.
    """
    colour = colour or _colours(results)
    drawn = 0
    for r in sorted(results, key=lambda r: (r["config"]["model"], r["config"]["method"])):
        mx, my = r["metrics"].get(x), r["metrics"].get(y)
        if mx is None or my is None:
            continue
        method, model = r["config"]["method"], r["config"]["model"]
        px, py = mx["mean"] * scale, my["mean"] * scale
        cont = ax.errorbar([px], [py], xerr=[_se(mx) * scale], yerr=[_se(my) * scale], marker="o", ms=8, capsize=3,
                           color=colour[method], ls="none", label=method)
        cont.lines[0].set_gid(f"series-{model}-{method}")
        if method == "none":
            for line in (ax.axvline(px, ls="--", lw=0.8), ax.axhline(py, ls="--", lw=0.8)):
                line.set(color=colour[method], alpha=0.6, zorder=0, gid=f"reference-{model}")
        ann = ax.annotate(method, (px, py), textcoords="offset points", xytext=(6, 5), fontsize=8)
        ann.set_gid(f"label-{model}-{method}")
        drawn += 1
    return drawn


def _panels(results: list[dict], x: str, y: str, scale: float) -> tuple[plt.Figure, list[tuple[str, plt.Axes]]]:
    """One panel per model (each with its own axis ranges), the method colours shared; only models with points."""
    colour = _colours(results)
    models = sorted({r["config"]["model"] for r in results
                     if r["metrics"].get(x) is not None and r["metrics"].get(y) is not None})
    cols = min(len(models), 2) or 1
    rows = math.ceil(len(models) / cols) or 1
    fig, axes = plt.subplots(rows, cols, figsize=(6.2 * cols + 1.8, 5.0 * rows), squeeze=False)
    panels = []
    for ax, model in zip(axes.flat, models):
        _scatter([r for r in results if r["config"]["model"] == model], x, y, scale, ax, colour)
        panels.append((model, ax))
    for ax in list(axes.flat)[len(models):]:
        ax.set_visible(False)
    return fig, panels


def _finish(fig: plt.Figure, panels: list[tuple[str, plt.Axes]], title: str, stem: Path) -> list[Path]:
    """Shared method legend right of the panels, the title, uncluttered point labels; writes PNG and SVG."""
    handles: dict[str, object] = {}
    for _, ax in panels:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.legend(handles.values(), handles.keys(), fontsize=8, title="method", title_fontsize=8, loc="upper left",
               bbox_to_anchor=(1.0, 0.9))
    for _, ax in panels:
        _unclutter_labels(ax)
    return save(fig, stem)


def _unclutter_labels(ax: plt.Axes) -> None:
    """Move each point label that would overlap another text to the nearest free place, with a leader line.

    Call once the axis limits and the layout are final. Labels are placed from the lowest point up, right of the
    point or else left of it, on the point's row or the nearest free row above or below; a moved label is redrawn
    with a thin grey line to its point.
    """
    labels = sorted((a for a in ax.texts if (a.get_gid() or "").startswith("label-")), key=lambda a: a.xy[::-1])
    renderer = ax.figure.canvas.get_renderer()
    px = ax.figure.dpi / 72  # pixels per point
    placed = [t.get_window_extent(renderer) for t in ax.texts if t not in labels]  # e.g. the iso-line labels
    for ann in labels:  # the markers (8 points wide)
        x, y = ax.transData.transform(ann.xy)
        placed.append(Bbox.from_extents(x - 5 * px, y - 5 * px, x + 5 * px, y + 5 * px))
    places = [(k, side) for k in (0, 1, -1, 2, -2, 3, -3, 4, -4) for side in (0, 1)]  # (rows up, left of point)
    for ann in labels:
        box = ann.get_window_extent(renderer)
        row, left = box.height + px, box.width + 12 * px  # one text row; right of the point → left of it
        k, side = next(((k, side) for k, side in places
                        if not any(box.translated(-side * left, k * row).overlaps(b) for b in placed)), (0, 0))
        placed.append(box.translated(-side * left, k * row))
        if k or side:
            x, y = ann.xyann
            text, xy, gid = ann.get_text(), ann.xy, ann.get_gid()
            ann.remove()
            ax.annotate(text, xy, textcoords="offset points", xytext=(-x if side else x, y + k * row / px),
                        ha="right" if side else "left", fontsize=8, gid=gid,
                        arrowprops={"arrowstyle": "-", "color": "grey", "lw": 0.6, "shrinkA": 0, "shrinkB": 4}
                        if k else None)


def plot_tradeoff(results: list[dict], output: Path, name: str = "tradeoff") -> list[Path]:
    """True% against Info%, one panel per model, with the unintervened run's cross and lines of equal True×Info."""
    import numpy as np

    fig, panels = _panels(results, "info", "true", 100.0)
    if not panels:
        plt.close(fig)
        raise ValueError("no run has both True and Info (run --task truthfulqa or truthfulqa-gen)")
    for model, ax in panels:
        x0, x1 = ax.get_xlim()
        y0, y1 = ax.get_ylim()
        xs = np.linspace(max(x0, 1.0), min(x1, 100.0), 200)
        lo, hi = max(x0, 0.0) * max(y0, 0.0) / 1e4, min(x1, 100.0) * min(y1, 100.0) / 1e4
        step = next((s for s in (0.01, 0.02, 0.05) if (hi - lo) / s <= 8), 0.1)  # at most 8 lines, or every 0.1
        for level in np.arange(step, 1.0 - 1e-9, step):
            ys = level * 1e4 / xs
            ok = (ys >= y0) & (ys <= y1)
            if ok.sum() > 1:
                ax.plot(xs[ok], ys[ok], ls=":", lw=0.8, color="grey", gid=f"iso-{level:.2g}")
                ax.annotate(f"True×Info = {level:.2g}", (xs[ok][-1], ys[ok][-1]), fontsize=7, color="grey",
                            textcoords="offset points", xytext=(-62, 2),
                            bbox={"fc": "white", "ec": "none", "pad": 0.5})
        ax.set_xlim(x0, x1)
        ax.set_ylim(y0, y1)
        ns = sorted({r["metrics"]["true"].get("n") for r in results
                     if r["config"]["model"] == model and "true" in r["metrics"]}, key=str)
        ax.set_title(f"{model} ({', '.join(str(n) for n in ns)} questions)", fontsize=10)
        ax.set_xlabel("Info (% of answers judged informative)")
        ax.set_ylabel("True (% of answers judged true)")
    judges = {(r.get("judge") or {}).get("backend", "?") for r in results if "true" in r["metrics"]}
    title = ("TruthfulQA generation: truthfulness vs informativeness (up and right is better)\n"
             f"judge: {', '.join(sorted(judges))}; bars: ± 1 s.e. over folds; dashed: the unintervened model")
    return _finish(fig, panels, title, Path(output) / name)


def plot_toxicity_fluency(results: list[dict], output: Path, name: str = "toxicity_fluency") -> list[Path]:
    """Expected maximum toxicity against conditional perplexity (both lower is better), one panel per model."""
    fig, panels = _panels(results, "fluency_ppl", "expected_max_toxicity", 1.0)
    if not panels:
        plt.close(fig)
        raise ValueError("no run has toxicity and fluency metrics (run --task toxicity)")
    for model, ax in panels:
        runs = [r for r in results if r["config"]["model"] == model and "fluency_ppl" in r["metrics"]]
        flu = {(r.get("scorer") or {}).get("fluency_model", "?") for r in runs}
        ppl = [r["metrics"]["fluency_ppl"]["mean"] for r in runs]
        ax.set_title(model, fontsize=10)
        log = min(ppl) > 0 and max(ppl) / min(ppl) >= 10  # an order of magnitude apart: log keeps both ends legible
        if log:
            ax.set_xscale("log")
        under = ", ".join(sorted(f.split(" (")[0] for f in flu))  # the alias, without the checksum
        ax.set_xlabel(f"Fluency: conditional perplexity (PPL{', log scale' if log else ''}) under {under}, "
                      "lower = more fluent")
        ax.set_ylabel(f"{axis_label('expected_max_toxicity')}, lower = less toxic")
    title = ("Toxicity vs fluency (RealToxicityPrompts continuations; down and left is better)\n"
             "bars: ± 1 s.e.; dashed: the unintervened model")
    return _finish(fig, panels, title, Path(output) / name)


def plot_results(results: list[dict], output: Path) -> list[Path]:
    """Every scatter the results support (trade-off, toxicity vs fluency); an empty list when none applies."""
    written: list[Path] = []
    if any({"true", "info"} <= set(r["metrics"]) for r in results):
        written += plot_tradeoff(results, output)
    if any({"fluency_ppl", "expected_max_toxicity"} <= set(r["metrics"]) for r in results):
        written += plot_toxicity_fluency(results, output)
    return written
