"""TruthfulQA judges: ``embedded`` (trained here from the human labels), ``openai`` and ``hf``."""

from __future__ import annotations

from bench.judges.base import ASPECTS, JUDGES, THRESHOLD, Judge, JudgeItem, Verdict, completion_prompt

__all__ = ["ASPECTS", "JUDGES", "THRESHOLD", "Judge", "JudgeItem", "Verdict", "completion_prompt", "get_judge", "judge_names",
           "judge_saved"]


def judge_saved(judge: Judge, verdict_file, items: dict[int, JudgeItem], chunk: int = 64) -> dict[int, dict]:
    """Verdicts for ``items`` (by question index), reusing those ``verdict_file`` holds under this judge's identity
    and appending new ones chunk by chunk, so an interrupted run keeps what was judged."""
    from bench.runs import append_progress, config_hash, read_progress

    judge_id = config_hash(judge.identity())
    done = {r["index"]: r for r in read_progress(verdict_file) if r.get("judge") == judge_id}
    todo = [i for i in items if i not in done]
    for s in range(0, len(todo), chunk):
        part = todo[s:s + chunk]
        recs = [{"index": i, "judge": judge_id, "p_true": v.p_true, "p_info": v.p_info}
                for i, v in zip(part, judge.judge([items[i] for i in part]))]
        append_progress(verdict_file, recs)
        done.update({r["index"]: r for r in recs})
    return {i: done[i] for i in items}


def judge_names() -> list[str]:
    """The registered backends (importing the built-in ones)."""
    import bench.judges.embedded  # noqa: F401 - registers the built-in backends
    import bench.judges.hf_judge  # noqa: F401
    import bench.judges.openai_judge  # noqa: F401

    return sorted(JUDGES)


def get_judge(name: str, **options) -> Judge:
    """Build the judge called ``name`` with backend ``options`` (unknown names list the valid ones)."""
    if name not in judge_names():
        raise ValueError(f"unknown judge {name!r}; valid: {', '.join(sorted(JUDGES))}")
    return JUDGES[name](**options)
