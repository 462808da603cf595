"""Paired comparisons of two methods answered on the same test items: a bootstrap interval of the accuracy
difference (or ratio), an exact McNemar test, and the verdict a threshold claim gets from an interval.

Items are keyed by a sortable id (a test item id, or `(seed, id)` when results of several seeds are pooled);
only the items both methods answered are compared.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from mmcompose.errors import MMComposeError

Outcomes = Mapping[Any, bool]
"""Per test item, whether a method answered it right."""

Verdict = Literal["holds", "does not hold", "undecided"]


def _paired(first: Outcomes, second: Outcomes) -> tuple[np.ndarray, np.ndarray]:
    shared = first.keys() & second.keys()
    if not shared:
        raise MMComposeError("no test item is shared by the two methods compared")
    ids = sorted(shared)  # a fixed order, so that a seeded draw is reproducible
    return (np.array([float(first[i]) for i in ids]), np.array([float(second[i]) for i in ids]))


def _draws(count: int, rounds: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(count, size=(rounds, count))


def paired_interval(first: Outcomes, second: Outcomes, *, rounds: int = 4000, seed: int = 0,
                    level: float = 0.95) -> tuple[float, float]:
    """Bootstrap interval (percentile, `level`) of accuracy(first) - accuracy(second) over the shared items.

    Items are resampled in pairs: both methods answered the same questions, and a paired interval is far
    tighter than two independent ones when the methods agree on most items.
    """
    a, b = _paired(first, second)
    means = (a - b)[_draws(len(a), rounds, seed)].mean(axis=1)
    tail = (1 - level) / 2
    return float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))


def paired_ratio_draws(first: Outcomes, second: Outcomes, *, rounds: int = 4000, seed: int = 0) -> np.ndarray:
    """Bootstrap draws of accuracy(first) / accuracy(second) over the shared items, resampled in pairs (a draw
    in which `second` gets nothing right counts as 0: nothing to keep, nothing kept). Several such
    distributions combine draw by draw, e.g. the lowest of four retention ratios."""
    a, b = _paired(first, second)
    draws = _draws(len(a), rounds, seed)
    numerator, denominator = a[draws].sum(axis=1), b[draws].sum(axis=1)
    return np.divide(numerator, denominator, out=np.zeros_like(numerator), where=denominator > 0)


@dataclass(frozen=True)
class McNemar:
    """Exact McNemar test: `first_only` items only the first method got right, `second_only` the reverse."""

    first_only: int
    second_only: int
    p_value: float


def mcnemar_exact(first: Outcomes, second: Outcomes) -> McNemar:
    """Two-sided exact McNemar test of "both methods are right equally often" on the shared items.

    Only discordant pairs carry information: under the null each is the first method's with probability 1/2,
    so the p-value is the two-sided binomial test of `first_only` successes in `first_only + second_only`
    trials, p = min(1, 2 P(X <= min(b, c))); with no discordant pair it is 1.
    """
    a, b = _paired(first, second)
    first_only, second_only = int(((a == 1) & (b == 0)).sum()), int(((a == 0) & (b == 1)).sum())
    trials, fewer = first_only + second_only, min(first_only, second_only)
    tail = sum(math.comb(trials, k) for k in range(fewer + 1)) / 2**trials if trials else 1.0
    return McNemar(first_only, second_only, min(1.0, 2 * tail))


def verdict(interval: tuple[float, float], threshold: float, *, strict: bool = False) -> Verdict:
    """A claim "value >= threshold" (`strict`: "value > threshold") given an interval of the value: it holds
    when the whole interval satisfies it, does not hold when none of it does, and is undecided when the
    interval straddles the threshold (noise cannot be told from a finding)."""
    low, high = interval
    if low > threshold or (low == threshold and not strict):
        return "holds"
    if high < threshold or (high == threshold and strict):
        return "does not hold"
    return "undecided"
