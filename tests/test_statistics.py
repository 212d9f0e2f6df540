"""The intervals and tests the project reports, pinned to published worked examples."""

from __future__ import annotations

import math

import pytest

from covid_eval.external_metrics import newcombe_interval
from covid_models.metrics import wilson_interval


def test_wilson_interval_matches_newcombe_1998_single_proportion_example():
    # Newcombe (1998), Statistics in Medicine 17:857, Table I: 81/263 -> 0.2553 to 0.3662 (method 3, Wilson).
    lo, hi = wilson_interval(81, 263)
    assert (round(lo, 4), round(hi, 4)) == (0.2553, 0.3662)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0  # clipped to [0, 1]
    assert all(math.isnan(v) for v in wilson_interval(0, 0))  # nothing counted: no interval


def test_newcombe_interval_matches_the_published_example_and_the_hybrid_formula():
    # Newcombe (1998), Statistics in Medicine 17:873, example (a): 56/70 - 48/80 -> +0.0524 to +0.3339 (method 10).
    lo, hi = newcombe_interval(56, 70, 48, 80)
    assert (round(lo, 4), round(hi, 4)) == (0.0524, 0.3339)
    # The hybrid score interval from the two Wilson intervals, written out.
    for s1, n1, s2, n2 in [(56, 70, 48, 80), (3, 40, 30, 40), (40, 40, 0, 40), (9, 10, 95, 100)]:
        p1, p2 = s1 / n1, s2 / n2
        (l1, u1), (l2, u2) = wilson_interval(s1, n1), wilson_interval(s2, n2)
        want = [max(-1.0, p1 - p2 - math.hypot(p1 - l1, u2 - p2)), min(1.0, p1 - p2 + math.hypot(u1 - p1, p2 - l2))]
        assert newcombe_interval(s1, n1, s2, n2) == pytest.approx(want, abs=1e-9)
        assert want[0] <= p1 - p2 <= want[1]
