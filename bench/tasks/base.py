"""Tasks as declarations: a task names its parts and how its inputs are loaded; a part evaluates one fold and
declares the metrics it produces. The runner (:mod:`bench.runner`) drives any task the same way and knows no task
by name; installed packages add tasks through the ``florain_bench.tasks`` entry-point group.

A part's ``evaluate(state, k, items, iv)`` gets the run's state (model, config, run folder, judge/scorer, the
task's inputs: :class:`bench.runner.RunState`), the fold number, the fold's evaluation items and its intervention
(``None``: unintervened); it returns ``{"metrics": {name: summary}, "records": [{"index": ..., ...}], ...}``, saved
as ``fold_K.<part>.json`` (resumable). ``records`` are merged by ``index`` into the per-question records.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from bench.metrics import Metric, declare

if TYPE_CHECKING:
    from bench.data.truthfulqa import Fold, Question


@dataclass
class Inputs:
    """What a run fits on and evaluates: the questions (or, e.g., steering texts grouped as questions), the folds,
    the data's checksum and record (``results.json`` ``data``), and task-specific extras (e.g. prompts)."""

    questions: list[Question]
    folds: list[Fold]
    checksum: str
    data: dict
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Part:
    """One evaluated part of a fold. ``reads``: a part whose saved output this one reads (recomputed with it).
    ``fold_record(result)``: entries the part adds to the fold's record (``"timings"``: merged into the fold's
    timings); ``finish(state, folds, results)``:
    what it adds to ``results.json`` (an instrument's identity, a text source); ``problems(cfg)``: its settings'
    checks (before anything loads)."""

    name: str
    evaluate: Callable[..., dict]
    metrics: tuple[Metric, ...] = ()
    reads: str | None = None
    fold_record: Callable[[dict], dict] | None = None
    fold_private: tuple[str, ...] = ()  # fold-record entries kept in fold_K.json only, not in results.json
    finish: Callable[[Any, list[dict], dict], None] | None = None
    problems: Callable[[Any], list[str]] | None = None
    settings: tuple[str, ...] = ()  # the run settings (RunConfig fields) only this part reads
    #: loads the part's own inputs (``prepare(cfg, data_dir, echo)``) with the task's, before the model loads or
    #: any file is written, so that bad inputs stop the run early; the result is ``state.shared[part.name]``
    prepare: Callable[[Any, Any, Callable[[str], None]], Any] | None = None

    @property
    def metric_names(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.metrics)


@dataclass(frozen=True)
class Task:
    """A task: its parts (evaluated in this order), how its inputs load (``inputs(cfg, data_dir, echo)``), how
    many items a fold evaluates (``evaluated(inputs, test_items)``), and its settings' checks. ``single_fit``: one
    fit for the whole run (no cross-validation: ``--folds`` does not apply). ``settings`` (here and on parts): a
    run that sets one its task does not read is refused (e.g. ``--samples`` on a TruthfulQA task)."""

    name: str
    description: str
    parts: tuple[str, ...]
    inputs: Callable[..., Inputs]
    items: str = "questions"
    max_new_tokens: int = 50
    single_fit: bool = False
    text_format: str = "qa"  # how a method's fit reads the inputs (bench.methods.FitContext)
    methods: tuple[str, ...] | None = None  # the methods it accepts (None: every method)
    problems: Callable[[Any], list[str]] | None = None
    settings: tuple[str, ...] = ()  # the run settings (RunConfig fields) only this task reads
    evaluated: Callable[[Inputs, list], int] = lambda inputs, items: len(items)


PARTS: dict[str, Part] = {}
TASKS: dict[str, Task] = {}
#: Tasks named by a prefix and an argument (``lm-eval:TASK[,TASK]``): prefix → factory of the task.
FAMILIES: dict[str, Callable[[str], Task]] = {}


def register_part(part: Part) -> Part:
    if part.name in PARTS and PARTS[part.name] is not part:
        raise ValueError(f"a part named {part.name!r} is already registered")
    declare(*part.metrics)
    PARTS[part.name] = part
    return part


def register_task(task: Task) -> Task:
    if task.name in TASKS and TASKS[task.name] is not task:
        raise ValueError(f"a task named {task.name!r} is already registered")
    unknown = [p for p in task.parts if p not in PARTS]
    if unknown:
        raise ValueError(f"task {task.name!r} names unregistered parts {unknown}; register them first")
    TASKS[task.name] = task
    return task
