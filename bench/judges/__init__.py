"""TruthfulQA judges: ``embedded`` (trained here from the human labels), ``openai`` and ``hf``."""

from __future__ import annotations

from bench.judges.base import ASPECTS, JUDGES, THRESHOLD, Judge, JudgeItem, Verdict, completion_prompt

__all__ = ["ASPECTS", "JUDGES", "THRESHOLD", "Judge", "JudgeItem", "Verdict", "completion_prompt", "get_judge", "judge_names"]


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
