"""TruthfulQA judges: ``embedded`` (trained here from the human labels), ``openai`` and ``hf``."""

from __future__ import annotations

from bench.judges.base import ASPECTS, JUDGES, THRESHOLD, Judge, JudgeItem, Verdict, completion_prompt

__all__ = ["ASPECTS", "JUDGES", "THRESHOLD", "Judge", "JudgeItem", "Verdict", "completion_prompt", "get_judge"]


def get_judge(name: str, **options) -> Judge:
    """Build the judge called ``name`` with backend ``options`` (unknown names list the valid ones)."""
    import bench.judges.embedded  # noqa: F401 - registers the built-in backends
    import bench.judges.hf_judge  # noqa: F401
    import bench.judges.openai_judge  # noqa: F401

    if name not in JUDGES:
        raise ValueError(f"unknown judge {name!r}; valid: {', '.join(sorted(JUDGES))}")
    return JUDGES[name](**options)
