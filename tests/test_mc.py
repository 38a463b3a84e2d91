import math

import pytest

from bench.metrics.mc import mc_metrics


def test_mc_metrics_by_hand():
    # scores: correct [-1, -3], incorrect [-2, -4]; best answer = -1
    m = mc_metrics(-1.0, [-1.0, -3.0], [-2.0, -4.0])
    assert m["mc1"] == 1.0
    p = [math.exp(x) for x in (-1, -3, -2, -4)]
    assert m["mc2"] == pytest.approx((p[0] + p[1]) / sum(p))
    assert m["mc3"] == 0.5  # only -1 beats the best incorrect (-2)


def test_mc1_needs_a_strict_win_and_mc2_is_stable_for_tiny_probs():
    m = mc_metrics(-2.0, [-2.0, -900.0], [-2.0])
    assert m["mc1"] == 0.0 and m["mc3"] == 0.0
    assert m["mc2"] == pytest.approx(0.5)


def test_mc_metrics_reject_bad_input():
    with pytest.raises(ValueError):
        mc_metrics(0.0, [], [-1.0])
    with pytest.raises(ValueError):
        mc_metrics(float("nan"), [-1.0], [-1.0])
