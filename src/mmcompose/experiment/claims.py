"""The paper's claims, each checked on paired test items with an interval and a verdict.

A claim is a threshold on a paired statistic of two methods (the accuracy difference on MCUB-4, or the
retention ratio on the single-modality tests). Items are keyed `(seed, item id)`, so one seed and a pool of
seeds are checked the same way. A claim holds when its whole 95% interval clears the threshold, does not hold
when none of it does, and is undecided when the interval straddles it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from mmcompose.data import names
from mmcompose.eval.stats import Outcomes, mcnemar_exact, paired_interval, paired_ratio_draws, verdict
from mmcompose.experiment.plan import DAMC, NAIVE, SEARCHED, single_id
from mmcompose.world import MODALITIES

MethodOutcomes = Mapping[str, Mapping[str, Outcomes]]
"""method id -> task -> outcomes of its items."""

ROUNDS = 4000


def accuracy(outcomes: Outcomes) -> float:
    return sum(map(bool, outcomes.values())) / len(outcomes) if outcomes else 0.0


def _difference(first: Outcomes, second: Outcomes, threshold: float, strict: bool) -> dict[str, Any]:
    low, high = paired_interval(first, second, rounds=ROUNDS)
    return {"estimate": accuracy(first) - accuracy(second), "interval": [low, high],
            "verdict": verdict((low, high), threshold, strict=strict),
            "note": f" (difference {100 * low:+.1f} to {100 * high:+.1f} points, 95%)"}


def paper_claims(outcomes: MethodOutcomes) -> list[dict[str, Any]]:
    """The paper's claims for uniform-lambda DAMC, NaiveMC (linear merges) and searched-lambda DAMC.

    `outcomes` needs MCUB-4 for DAMC, NaiveMC, searched DAMC and the four single-modality models, and each
    modality's own test for DAMC and that modality's single model.
    """
    def mcub4(method: str) -> Outcomes:
        return outcomes[method][names.MCUB4]

    singles = [single_id(m) for m in MODALITIES]
    best = max(singles, key=lambda method: accuracy(mcub4(method)))
    damc, naive, searched = mcub4(DAMC), mcub4(NAIVE), mcub4(SEARCHED)

    beats_single = _difference(damc, mcub4(best), 0.0, strict=True)
    beats_naive = _difference(damc, naive, 0.10, strict=False)
    test = mcnemar_exact(damc, naive)
    beats_naive["mcnemar"] = {"damc_only": test.first_only, "naive_only": test.second_only, "p_value": test.p_value}
    beats_naive["note"] += f", exact McNemar p = {test.p_value:.3g} ({test.first_only} vs {test.second_only})"
    searched_check = _difference(searched, damc, 0.0, strict=False)

    ratios = {m: accuracy(outcomes[DAMC][m]) / accuracy(outcomes[single_id(m)][m])
              if accuracy(outcomes[single_id(m)][m]) else 0.0 for m in MODALITIES}
    lowest = min(ratios.values())
    draws = np.min([paired_ratio_draws(outcomes[DAMC][m], outcomes[single_id(m)][m], rounds=ROUNDS, seed=index)
                    for index, m in enumerate(MODALITIES)], axis=0)
    kept = (float(np.quantile(draws, 0.025)), float(np.quantile(draws, 0.975)))
    retention = {"estimate": lowest, "interval": list(kept), "verdict": verdict(kept, 0.95),
                 "retention": ratios, "note": f" (interval {100 * kept[0]:.1f}% to {100 * kept[1]:.1f}%, 95%)"}

    checks = [
        ("damc-beats-singles", "DAMC beats every single-modality model on MCUB-4",
         f"{100 * accuracy(damc):.1f}% vs best single {100 * accuracy(mcub4(best)):.1f}%", beats_single),
        ("damc-beats-naive", "DAMC beats NaiveMC by >= 10 points on MCUB-4",
         f"{100 * beats_naive['estimate']:+.1f} points", beats_naive),
        ("damc-retention", "DAMC keeps >= 95% of each source model's single-modality accuracy",
         f"lowest retention {100 * lowest:.1f}%", retention),
        ("search-beats-uniform", "searched lambda (validation) >= uniform lambda on MCUB-4",
         f"{100 * accuracy(searched):.1f}% vs {100 * accuracy(damc):.1f}%", searched_check),
    ]
    return [{"id": key, "claim": text, "measured": measured + check.pop("note"), **check}
            for key, text, measured, check in checks]
