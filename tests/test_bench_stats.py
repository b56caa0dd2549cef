"""Statistics helpers of the benchmarks (bench/_common.py): median, quartiles and the bootstrap CI of the median."""

from __future__ import annotations

import os
import random
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import _common as common


def test_summarize_median_and_quartiles():
    s = common.summarize([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (s.median, s.p25, s.p75, s.n) == (3.0, 2.0, 4.0, 5)


def test_median_ci_brackets_the_median_and_narrows_with_more_rounds():
    rng = random.Random(1)
    few = [1.02 + rng.gauss(0, 0.05) for _ in range(40)]
    many = [1.02 + rng.gauss(0, 0.05) for _ in range(1000)]
    lo_few, hi_few = common.median_ci(few)
    lo_many, hi_many = common.median_ci(many)
    assert lo_few <= common.summarize(few).median <= hi_few
    assert lo_many <= 1.02 <= hi_many  # the true median
    assert hi_many - lo_many < (hi_few - lo_few) / 2  # 25x the rounds: about 1/5 of the width
    assert common.median_ci(few) == common.median_ci(few)  # seeded: reproducible


def test_median_ci_of_constant_rounds_is_a_point_and_bad_input_raises():
    assert common.median_ci([1.5] * 7) == (1.5, 1.5)
    with pytest.raises(ValueError, match="at least one value"):
        common.median_ci([])
    with pytest.raises(ValueError, match="level"):
        common.median_ci([1.0], level=1.5)
