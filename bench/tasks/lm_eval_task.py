"""``--task lm-eval:TASK[,TASK]``: lm-eval tasks evaluated through the harness with the fold's intervention.

``truthfulqa_mc1`` / ``truthfulqa_mc2`` are mapped to lm-eval's own task configs over a local file built from the
fold's *test* questions (offline, cross-validated). Other tasks load their data as lm-eval does (the Hub or its
cache), so they need network access or a prepared cache.
"""

from __future__ import annotations

import math
from pathlib import Path

from bench.data.truthfulqa import Question
from bench.models import LoadedModel
from bench.tasks.base import FAMILIES, Part, Task, register_part
from bench.tasks.truthfulqa import truthfulqa_inputs

LOCAL = {"truthfulqa_mc1": "bench_truthfulqa_mc1", "truthfulqa_mc2": "bench_truthfulqa_mc2"}


def parse_tasks(task: str) -> list[str]:
    """``lm-eval:a,b`` → ``["a", "b"]``."""
    names = [t.strip() for t in task.split(":", 1)[1].split(",") if t.strip()]
    if not names:
        raise ValueError("--task lm-eval: needs at least one task name, e.g. lm-eval:truthfulqa_mc1,truthfulqa_mc2")
    return names


def evaluate_lm_eval(lm: LoadedModel, intervention, tasks: list[str], test_questions: list[Question],
                     workdir: Path, batch_size: int = 16) -> dict[str, dict]:
    """``{f"{task}/{metric}": {"mean", "se", "n"}}`` for every numeric metric lm-eval reports."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from bench.lm_eval_plugin import InterventionLM, write_truthfulqa_tasks

    write_truthfulqa_tasks(test_questions, workdir)
    resolved = [LOCAL.get(t, t) for t in tasks]
    model = InterventionLM(pretrained=lm, intervention=intervention, batch_size=batch_size)
    out = lm_eval.simple_evaluate(model=model, tasks=resolved, task_manager=TaskManager(include_path=str(workdir)))
    metrics = {}
    for name, shown in zip(resolved, tasks):
        res = out["results"][name]
        n = int(out.get("n-samples", {}).get(name, {}).get("effective", len(test_questions)))
        for key, value in res.items():
            if not isinstance(value, (int, float)) or "_stderr" in key or key == "alias":
                continue
            metric = key.split(",")[0]
            se = res.get(key.replace(metric, f"{metric}_stderr", 1))
            metrics[f"{shown}/{metric}"] = {"mean": float(value),
                                            "se": float(se) if isinstance(se, (int, float)) else math.nan, "n": n}
    return metrics


def _part(state, k: int, qs: list[Question], iv) -> dict:
    if iv is not None and not iv.modules:
        raise ValueError(f"{state.cfg.method} is prompt-only; lm-eval tasks take --num_fewshot instead")
    return {"metrics": evaluate_lm_eval(state.lm, iv, parse_tasks(state.cfg.task), qs, state.folder.lm_eval(k),
                                        state.cfg.eval_batch_size)}


def lm_eval_task(name: str) -> Task:
    """The task ``lm-eval:TASK[,TASK]`` (its metrics are whatever lm-eval reports, so none is declared)."""
    tasks = parse_tasks(name)
    return Task(name, f"lm-eval tasks {', '.join(tasks)} on each fold's test questions", ("lm-eval",),
                truthfulqa_inputs)


def _problems(cfg) -> list[str]:
    """lm-eval task names it does not know (asked only for names beyond the offline TruthfulQA ones: lm-eval's
    task index takes seconds to build)."""
    names = [n for n in parse_tasks(cfg.task) if n not in LOCAL]
    if not names:
        return []
    from lm_eval.tasks import TaskManager

    known = set(TaskManager().all_tasks)
    return [f"unknown lm-eval task {n!r}; valid: {', '.join(LOCAL)} (offline) or any task `lm-eval --tasks list` "
            "shows" for n in names if n not in known]


register_part(Part("lm-eval", _part, problems=_problems, settings=("eval_batch_size",)))
FAMILIES["lm-eval"] = lm_eval_task
