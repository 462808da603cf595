"""The paper's claims, read off a results table written by hand."""

from __future__ import annotations

from mmcompose.experiment.demo import paper_claims
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
