"""`demo --seeds`: each seed's pipeline in its own directory, then the claims on all seeds' items pooled."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from rich.console import Console

from mmcompose.experiment import demo as demo_module
from mmcompose.experiment.claims import paper_claims
from mmcompose.experiment.plan import DAMC, NAIVE, SEARCHED, Plan, demo_plan, single_id
from mmcompose.world import MODALITIES


def _seed_outcomes(seed: int, damc: int, naive: int) -> dict:
    """Per method and task: the first `right` of 20 items right, keyed (seed, item)."""
    def items(right: int) -> dict:
        return {(seed, f"q{i}"): i < right for i in range(20)}

    outcomes = {single_id(m): {"MCUB-4": items(5), m: items(18)} for m in MODALITIES}
    outcomes[DAMC] = {"MCUB-4": items(damc), **{m: items(18) for m in MODALITIES}}
    outcomes[NAIVE] = {"MCUB-4": items(naive)}
    outcomes[SEARCHED] = {"MCUB-4": items(damc)}
    return outcomes


def test_claims_are_pooled_over_the_seeds_items(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    per_seed = {0: _seed_outcomes(0, damc=12, naive=10), 1: _seed_outcomes(1, damc=14, naive=8)}

    plan = demo_plan("quick", "one-rate")

    def fake_run_demo(out: Path, run_plan: Plan, seed: int, console: Console, jobs: int | None) -> dict:
        calls.append((out, seed, run_plan))
        outcomes = per_seed[seed]
        return {"outcomes": outcomes, "claims": paper_claims(outcomes), "labels": run_plan.labels()}

    monkeypatch.setattr(demo_module, "run_demo", fake_run_demo)
    screen = io.StringIO()
    report = demo_module.run_seeds(plan, [0, 1], tmp_path, Console(file=screen, width=200), 2)
    assert calls == [(tmp_path / "s0", 0, plan), (tmp_path / "s1", 1, plan)]
    lead = next(c for c in report["claims"] if c["id"] == "damc-beats-naive")
    assert lead["estimate"] == pytest.approx((26 - 18) / 40)  # 40 pooled items, not a mean of two seeds' numbers
    assert lead["mcnemar"] == {"damc_only": 8, "naive_only": 0, "p_value": pytest.approx(2 * 0.5**8)}
    assert report["results"][DAMC]["MCUB-4"] == pytest.approx(26 / 40)
    written = json.loads((tmp_path / "pooled.json").read_text())
    assert written["seeds"] == [0, 1] and set(written["per_seed"]) == {"0", "1"}
    text = screen.getvalue()
    assert "pooled claim: DAMC beats NaiveMC by >= 10 points on MCUB-4: +20.0 points" in text
    assert "per seed and pooled" in text
