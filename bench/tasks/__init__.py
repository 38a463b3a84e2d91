"""Tasks: what the model is asked to do, with an intervention active at the positions the method defines.

Each task is a declaration (:class:`bench.tasks.base.Task`) of parts (:class:`bench.tasks.base.Part`), each part
declaring the metrics it produces. Built in: ``truthfulqa-mc``, ``truthfulqa-gen``, ``truthfulqa``, ``kl-ce``
(:mod:`bench.tasks.truthfulqa`), ``toxicity`` (:mod:`bench.tasks.toxicity`) and ``lm-eval:TASK[,TASK]``
(:mod:`bench.tasks.lm_eval_task`). Installed packages add tasks through the ``florain_bench.tasks`` entry-point
group: the entry point names a module (or object) whose import registers its parts and tasks.
"""

from __future__ import annotations

import logging
from importlib.metadata import entry_points

from bench.tasks import lm_eval_task, toxicity, truthfulqa  # noqa: F401 - importing registers the built-in tasks
from bench.tasks.base import FAMILIES, PARTS, TASKS, Inputs, Part, Task, register_part, register_task

__all__ = ["PARTS", "TASKS", "Inputs", "Part", "Task", "get_task", "load_plugins", "register_part", "register_task",
           "task_names"]
ENTRY_POINT_GROUP = "florain_bench.tasks"
log = logging.getLogger(__name__)
_plugins_loaded = False


def load_plugins() -> None:
    """Import the installed packages' task plugins once (a plugin that fails to import is logged and skipped)."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            ep.load()
        except Exception as err:  # noqa: BLE001 - a broken plugin must not break the built-in tasks
            log.warning("task plugin %s (%s) failed to load: %s", ep.name, ep.value, err)


def task_names() -> list[str]:
    load_plugins()
    return [*TASKS, *(f"{prefix}:TASK[,TASK]" for prefix in FAMILIES)]


def get_task(name: str) -> Task:
    """The registered task ``name`` (or a family's, e.g. ``lm-eval:truthfulqa_mc1``)."""
    load_plugins()
    if name in TASKS:
        return TASKS[name]
    prefix = name.split(":", 1)[0]
    if ":" in name and prefix in FAMILIES:
        return FAMILIES[prefix](name)
    raise ValueError(f"unknown task {name!r}; valid: {', '.join(task_names())}")
