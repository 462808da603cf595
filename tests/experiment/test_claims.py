"""The paper's claims, read off item outcomes written by hand: pooled point estimates, intervals, verdicts."""

from __future__ import annotations

import pytest

from mmcompose.experiment.claims import paper_claims
from mmcompose.experiment.plan import DAMC, NAIVE, SEARCHED, single_id
from mmcompose.world import MODALITIES


def _items(right: int, total: int, seed: int = 0) -> dict[tuple[int, str], bool]:
    """`right` of `total` items answered right: the first ones."""
    return {(seed, f"q{i}"): i < right for i in range(total)}


def _outcomes(damc: int, naive: int, searched: int, best_single: int, kept: dict[str, tuple[int, int]],
              total: int = 40) -> dict:
    """MCUB-4 outcomes (right of `total`) and, per modality, (DAMC right, single right) of 20 own-test items."""
    outcomes = {single_id(m): {"MCUB-4": _items(best_single if m == "image" else 5, total),
                               m: _items(kept[m][1], 20)} for m in MODALITIES}
    outcomes[DAMC] = {"MCUB-4": _items(damc, total), **{m: _items(kept[m][0], 20) for m in MODALITIES}}
    outcomes[NAIVE] = {"MCUB-4": _items(naive, total)}
    outcomes[SEARCHED] = {"MCUB-4": _items(searched, total)}
    return outcomes


def test_verdicts_follow_the_intervals() -> None:
    # Every right answer of the weaker method is a right answer of the stronger one (first items): all pairs
    # differ by 0 or +1, so the intervals are tight and one-sided.
    full = dict.fromkeys(MODALITIES, (20, 20))
    checks = {c["id"]: c for c in paper_claims(_outcomes(damc=36, naive=4, searched=36, best_single=10, kept=full))}
    assert checks["damc-beats-singles"]["verdict"] == "holds"
    assert checks["damc-beats-singles"]["measured"].startswith("90.0% vs best single 25.0%")
    lead = checks["damc-beats-naive"]
    assert lead["verdict"] == "holds" and lead["estimate"] == 0.8
    assert lead["mcnemar"] == {"damc_only": 32, "naive_only": 0, "p_value": 2 * 0.5**32}
    assert checks["damc-retention"]["verdict"] == "holds" and checks["damc-retention"]["interval"] == [1.0, 1.0]
    assert checks["search-beats-uniform"]["verdict"] == "holds"  # identical answers: >= holds
    assert checks["search-beats-uniform"]["interval"] == [0.0, 0.0]


def test_a_small_lead_is_undecided_and_a_reversal_does_not_hold() -> None:
    kept = {**dict.fromkeys(MODALITIES, (20, 20)), "video": (10, 20)}
    checks = {c["id"]: c for c in paper_claims(_outcomes(damc=22, naive=20, searched=21, best_single=22, kept=kept))}
    assert checks["damc-beats-singles"]["verdict"] == "does not hold"  # a tie, and "beats" is strict
    assert checks["damc-beats-naive"]["verdict"] == "undecided"  # +5 points, interval 0 to ~+12.5
    assert checks["damc-beats-naive"]["mcnemar"]["p_value"] == 0.5  # 2 vs 0 discordant: 2 * 1/4
    assert checks["damc-retention"]["verdict"] == "does not hold"
    assert checks["damc-retention"]["measured"].startswith("lowest retention 50.0%")
    assert checks["damc-retention"]["retention"]["video"] == 0.5
    assert checks["search-beats-uniform"]["verdict"] == "undecided"  # -2.5 points, but its interval reaches 0
    assert checks["search-beats-uniform"]["interval"][1] == 0.0


def test_pooling_seeds_narrows_the_interval() -> None:
    full = dict.fromkeys(MODALITIES, (20, 20))
    one = _outcomes(damc=28, naive=20, searched=28, best_single=10, kept=full)
    pooled = {method: {task: {(seed, item[1]): right for seed in range(3) for item, right in items.items()}
                       for task, items in tasks.items()} for method, tasks in one.items()}
    single, together = ({c["id"]: c for c in paper_claims(o)} for o in (one, pooled))
    width = [c["damc-beats-naive"]["interval"][1] - c["damc-beats-naive"]["interval"][0] for c in (single, together)]
    assert single["damc-beats-naive"]["estimate"] == pytest.approx(together["damc-beats-naive"]["estimate"]) == 0.2
    assert width[1] < width[0]
    assert together["damc-beats-naive"]["mcnemar"]["damc_only"] == 24
