"""The paper's claims, read off a results table written by hand."""

from __future__ import annotations

import pytest

from mmcompose.errors import MMComposeError
from mmcompose.experiment.demo import paired_interval, paper_claims
from mmcompose.world import MODALITIES


def test_claims_are_read_off_the_mcub4_column_and_the_retention() -> None:
    results = {f"{m}-LLM (own input only)": {"MCUB-4": 0.40} for m in MODALITIES}
    results["image-LLM (own input only)"]["MCUB-4"] = 0.50
    results["DAMC (linear, 1/M)"] = {"MCUB-4": 0.62}
    results["NaiveMC (linear)"] = {"MCUB-4": 0.55}
    results["DAMC (searched λ, val)"] = {"MCUB-4": 0.62}
    retention = {"DAMC (linear, 1/M)": {"image": 1.0, "audio": 0.97, "video": 0.94, "point": None}}
    checks = {c["claim"]: (c["holds"], c["measured"]) for c in paper_claims(results, retention)}
    assert checks == {
        "DAMC beats every single-modality model on MCUB-4": (True, "62.0% vs best single 50.0%"),
        "DAMC beats NaiveMC by >= 10 points on MCUB-4": (False, "+7.0 points"),
        "DAMC keeps >= 95% of each source model's single-modality accuracy": (False, "lowest retention 0.0%"),
        "searched lambda (validation) >= uniform lambda on MCUB-4": (True, "62.0% vs 62.0%"),
    }


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


def test_claims_carry_the_paired_interval_when_given_the_items() -> None:
    names = [f"{m}-LLM (own input only)" for m in MODALITIES] + ["DAMC (linear, 1/M)", "NaiveMC (linear)",
                                                                  "DAMC (searched λ, val)"]
    ids = [f"q{i}" for i in range(20)]
    outcomes = {name: dict.fromkeys(ids, False) for name in names}
    outcomes["DAMC (linear, 1/M)"] = dict.fromkeys(ids, True)
    outcomes["DAMC (searched λ, val)"] = dict.fromkeys(ids, True)
    results = {name: {"MCUB-4": sum(o.values()) / len(ids)} for name, o in outcomes.items()}
    retention = {"DAMC (linear, 1/M)": dict.fromkeys(MODALITIES, 1.0)}
    checks = {c["claim"]: c for c in paper_claims(results, retention, outcomes)}
    lead = checks["DAMC beats NaiveMC by >= 10 points on MCUB-4"]
    assert lead["holds"] and lead["interval"] == [1.0, 1.0]
    assert lead["measured"] == "+100.0 points (difference +100.0 to +100.0 points, 95%)"
    assert checks["searched lambda (validation) >= uniform lambda on MCUB-4"]["interval"] == [0.0, 0.0]
    assert "interval" not in checks["DAMC keeps >= 95% of each source model's single-modality accuracy"]
