"""Metrics and their metadata. A metric is declared once, by the task part that produces it (``bench/tasks/``):
name, display label, unit, direction and table position. Tables, sweeps, plots and the regression check read it
here; a name no part declares (e.g. an lm-eval task's) gets its own name as label, "fraction", higher is better.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Metric:
    """What a number means: ``label`` for tables and plots (values are fractions, not percentages, unless
    ``unit`` says otherwise); ``higher_is_better`` for sweeps and regressions; ``column``: position among a
    table's columns (lower first; then alphabetical)."""

    name: str
    label: str
    unit: str = "fraction"
    higher_is_better: bool = True
    column: int = 1000
    sweep_plot: bool = False  # drawn by default in a sweep plot


_DECLARED: dict[str, Metric] = {}


def declare(*metrics: Metric) -> tuple[str, ...]:
    """Register metrics (a part's, at import); returns their names. A name declared twice must mean the same."""
    for m in metrics:
        if _DECLARED.setdefault(m.name, m) != m:
            raise ValueError(f"metric {m.name!r} is declared twice with different metadata: {_DECLARED[m.name]} "
                             f"and {m}")
    return tuple(m.name for m in metrics)


def declared() -> dict[str, Metric]:
    """Every declared metric (the built-in tasks' and installed plugins'), by name."""
    import bench.tasks  # noqa: F401 - importing the tasks declares their parts' metrics

    bench.tasks.load_plugins()
    return dict(_DECLARED)


def metric(name: str) -> Metric:
    return declared().get(name) or Metric(name, name)


def label(name: str) -> str:
    return metric(name).label


def unit(name: str) -> str:
    return metric(name).unit


def higher_is_better(name: str) -> bool:
    """Direction of a metric, for choosing sweep values and flagging regressions."""
    return metric(name).higher_is_better


def ordered(names) -> list[str]:
    """Metric names in table column order."""
    return sorted(names, key=lambda m: (metric(m).column, m))
