"""The regression check is two-sided: a score that moves beyond its tolerance fails whichever way it moves."""

from __future__ import annotations

import copy

import pytest

from bench.regress import EXACT_TOLERANCE, FAILING, TOLERANCES, compare, make_reference, render, tolerance


def _score(mean: float) -> dict:
    return {"mean": mean, "se": 0.05, "n": 30}


def _current() -> dict:
    """A benchmark result shaped like :func:`bench.regress.run_benchmark`'s (synthetic numbers)."""
    scores = {"none": {"mc1": _score(0.1), "mc2": _score(0.272), "true": _score(7 / 15), "ce": _score(5.4),
                       "kl": _score(0.0)},
              "florain": {"mc1": _score(0.2333), "mc2": _score(0.4676), "true": _score(23 / 30), "ce": _score(5.73),
                          "kl": _score(0.6)}}
    return {"config": {"model": "x", "metrics": ["mc1", "mc2", "true", "ce", "kl"]}, "scores": scores, "errors": {},
            "effects": {"florain": 0.6}, "environment": {"packages": {"torch": "x"}}}


def _moved(method: str, metric: str, delta: float) -> tuple[bool, dict, list[str]]:
    ref = make_reference(_current())
    cur = copy.deepcopy(_current())
    cur["scores"][method][metric]["mean"] += delta
    passed, rows, problems = compare(ref, cur)
    return passed, {(r.method, r.metric): r for r in rows}, problems


def test_unchanged_scores_pass_and_none_is_held_to_float_noise():
    ref = make_reference(_current())
    passed, rows, problems = compare(ref, _current())
    assert passed and not problems and {r.status for r in rows} == {"ok"}
    assert ref["method_tolerances"] == {"none": EXACT_TOLERANCE} and EXACT_TOLERANCE < 1 / 30 / 10
    assert tolerance(ref, "none", "mc2") == EXACT_TOLERANCE and tolerance(ref, "florain", "mc2") == TOLERANCES["mc2"]
    old = {k: v for k, v in ref.items() if k != "method_tolerances"}  # a reference from before per-method tolerances
    assert tolerance(old, "none", "ce") == EXACT_TOLERANCE


@pytest.mark.parametrize("metric, delta, status", [
    ("mc1", 1 / 30, "BETTER"),  # one more question right: an inflated score fails
    ("mc1", -1 / 30, "WORSE"),
    ("mc2", 0.001, "BETTER"),  # far inside a fitted method's tolerance (0.02), far outside float noise
    ("mc2", -0.001, "WORSE"),
    ("true", 1 / 30, "BETTER"),
    ("ce", -0.001, "BETTER"),  # lower is better for CE and KL
    ("ce", 0.001, "WORSE"),
    ("kl", 0.001, "WORSE"),
])
def test_none_fails_when_a_score_moves_either_way(metric, delta, status):
    passed, rows, problems = _moved("none", metric, delta)
    assert not passed and rows[("none", metric)].status == status and status in FAILING
    assert all(r.status == "ok" for k, r in rows.items() if k != ("none", metric))
    assert any("make regress-update" in p and f"none {metric} ({status.lower()})" in p for p in problems)
    assert f"| {status} |" in render(list(rows.values()), problems)


@pytest.mark.parametrize("delta", [1e-6, -1e-6, 5e-5, -5e-5])
def test_none_passes_within_float_noise(delta):
    for metric in ("mc2", "ce", "kl"):
        passed, rows, problems = _moved("none", metric, delta)
        assert passed and not problems and rows[("none", metric)].status == "ok"


def test_a_fitted_method_fails_when_it_improves_beyond_its_tolerance():
    passed, rows, problems = _moved("florain", "mc2", TOLERANCES["mc2"] + 0.01)
    assert not passed and rows[("florain", "mc2")].status == "BETTER"
    assert "leak" in problems[-1] and "make regress-update" in problems[-1]
    passed, rows, _ = _moved("florain", "kl", -(TOLERANCES["kl"] + 0.01))  # lower KL than the reference: better
    assert not passed and rows[("florain", "kl")].status == "BETTER"
    passed, rows, _ = _moved("florain", "mc2", -(TOLERANCES["mc2"] + 0.01))
    assert not passed and rows[("florain", "mc2")].status == "WORSE"
    passed, rows, _ = _moved("florain", "mc2", TOLERANCES["mc2"] / 2)  # within tolerance, either way
    assert passed and rows[("florain", "mc2")].status == "ok"
    passed, rows, _ = _moved("florain", "mc2", -TOLERANCES["mc2"] / 2)
    assert passed


def test_no_effect_rule_still_fails():
    ref = make_reference(_current())
    cur = copy.deepcopy(_current())
    cur["scores"]["florain"] = copy.deepcopy(cur["scores"]["none"])
    cur["effects"] = {"florain": 0.0}
    passed, rows, problems = compare(ref, cur)
    assert not passed and any(r.status == "NO EFFECT" for r in rows)
    assert any("no longer changes any score" in p for p in problems)
