"""Paired statistics: the exact McNemar test against hand-computed binomial tails (and scipy where installed),
the bootstrap intervals at their exact extremes, and the verdict of a threshold claim."""

from __future__ import annotations

import numpy as np
import pytest

from mmcompose.errors import MMComposeError
from mmcompose.eval.stats import mcnemar_exact, paired_interval, paired_ratio_draws, verdict


def _pairs(both: int, first_only: int, second_only: int, neither: int) -> tuple[dict, dict]:
    """Outcomes of two methods with the given counts of each (first, second) answer pattern."""
    pattern = [(True, True)] * both + [(True, False)] * first_only + [(False, True)] * second_only + \
        [(False, False)] * neither
    return ({f"q{i}": a for i, (a, _) in enumerate(pattern)}, {f"q{i}": b for i, (_, b) in enumerate(pattern)})


@pytest.mark.parametrize(("first_only", "second_only", "expected"), [
    (0, 0, 1.0),  # no discordant pair: nothing to tell the methods apart
    (3, 0, 0.25),  # 2 * (1/2)^3
    (5, 0, 0.0625),  # 2 * (1/2)^5
    (1, 5, 0.21875),  # 2 * (1 + 6) / 64
    (10, 2, 0.0385742188),  # 2 * (1 + 12 + 66) / 4096
    (4, 4, 1.0),  # 2 * P(X <= 4 | n=8) = 2 * 163/256 > 1, capped
])
def test_mcnemar_matches_hand_computed_binomial_tails(first_only: int, second_only: int, expected: float) -> None:
    first, second = _pairs(7, first_only, second_only, 4)  # concordant pairs must not matter
    test = mcnemar_exact(first, second)
    assert (test.first_only, test.second_only) == (first_only, second_only)
    assert test.p_value == pytest.approx(expected, abs=1e-9)


def test_mcnemar_matches_scipy_binomtest() -> None:
    stats = pytest.importorskip("scipy.stats")
    for first_only, second_only in [(0, 1), (2, 9), (13, 6), (20, 20), (31, 12)]:
        first, second = _pairs(3, first_only, second_only, 2)
        reference = stats.binomtest(first_only, first_only + second_only, 0.5).pvalue
        assert mcnemar_exact(first, second).p_value == pytest.approx(reference, rel=1e-12)


def test_mcnemar_is_symmetric_and_uses_only_shared_items() -> None:
    first, second = _pairs(2, 6, 1, 3)
    assert mcnemar_exact(first, second).p_value == mcnemar_exact(second, first).p_value
    extra = {**first, "only-first": True}
    assert mcnemar_exact(extra, second) == mcnemar_exact(first, second)


def test_paired_interval_is_exact_at_the_extremes_and_brackets_the_difference() -> None:
    ids = [f"q{i}" for i in range(40)]
    right, wrong = dict.fromkeys(ids, True), dict.fromkeys(ids, False)
    assert paired_interval(right, wrong) == (1.0, 1.0)
    assert paired_interval(right, right) == (0.0, 0.0)
    # 30 of 40 right vs 20 of 40, the 20 a subset of the 30: every pair differs by 0 or +1, mean +0.25
    first = {i: n < 30 for n, i in enumerate(ids)}
    second = {i: n < 20 for n, i in enumerate(ids)}
    low, high = paired_interval(first, second)
    assert 0.0 < low < 0.25 < high < 0.5
    assert paired_interval(first, second) == (low, high)  # seeded
    with pytest.raises(MMComposeError, match="no test item"):
        paired_interval({"a": True}, {"b": True})


def test_paired_interval_takes_pooled_seed_item_keys() -> None:
    first = {(seed, f"q{i}"): i < 3 for seed in (0, 1) for i in range(4)}
    second = {(seed, f"q{i}"): i < 1 for seed in (0, 1) for i in range(4)}
    low, high = paired_interval(first, second)
    assert 0.0 <= low < 0.5 < high <= 1.0  # the pooled difference is 6/8 - 2/8 = 0.5


def test_ratio_draws_are_exact_when_the_items_agree() -> None:
    ids = [f"q{i}" for i in range(10)]
    source = {i: n < 8 for n, i in enumerate(ids)}
    assert np.all(paired_ratio_draws(source, source) == 1.0)
    half = {i: n < 4 for n, i in enumerate(ids)}  # right on a subset: the ratio is 4/8 at the point estimate
    draws = paired_ratio_draws(half, source)
    assert draws.min() >= 0.0 and draws.max() <= 1.0 and abs(float(np.median(draws)) - 0.5) < 0.1
    nothing = dict.fromkeys(ids, False)
    assert np.all(paired_ratio_draws(source, nothing) == 0.0)


@pytest.mark.parametrize(("interval", "threshold", "strict", "expected"), [
    ((0.12, 0.30), 0.10, False, "holds"),
    ((0.10, 0.30), 0.10, False, "holds"),  # ">= 10 points": an interval starting at 10 satisfies it
    ((0.00, 0.00), 0.00, True, "does not hold"),  # "beats": a tie does not
    ((0.00, 0.00), 0.00, False, "holds"),  # ">=": a tie does
    ((-0.05, 0.08), 0.10, False, "does not hold"),
    ((-0.05, 0.15), 0.10, False, "undecided"),
    ((-0.05, 0.15), 0.00, True, "undecided"),
    ((0.90, 1.00), 0.95, False, "undecided"),
])
def test_verdict_is_decided_only_by_a_whole_interval(interval: tuple[float, float], threshold: float, strict: bool,
                                                      expected: str) -> None:
    assert verdict(interval, threshold, strict=strict) == expected

