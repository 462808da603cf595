"""The quick demo end to end (in CI): every method on every task, a cached rerun, and a composed model that
beats chance on MCUB-world."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from rich.console import Console

from mmcompose.experiment.demo import MCUB_TASKS, run_demo
from mmcompose.experiment.demo import PROFILES as DEMO_PROFILES
from mmcompose.world import PROFILES


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("demo") / "run"
    return out, run_demo(out, "quick", seed=0, console=Console(quiet=True), jobs=2)


def test_every_method_on_every_task_and_a_cached_rerun(demo: tuple[Path, dict],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    out, first = demo
    results = first["results"]
    assert {"NaiveMC (linear)", "DAMC (linear, 1/M)", "joint training (upper ref.)",
            "tool pipeline (captions -> LLM)"} <= results.keys()
    for scores in results.values():
        assert all(v is None or 0.0 <= v <= 1.0 for v in scores.values())
    assert (out / "results.json").is_file() and (out / "results.png").stat().st_size > 0

    def no_loading(*args, **kwargs):
        raise AssertionError("a cached rerun must not load any model")

    monkeypatch.setattr("mmcompose.experiment.demo.load_checkpoint", no_loading)
    monkeypatch.setattr("mmcompose.experiment.demo.MultimodalLLM.from_base", no_loading)
    second = run_demo(out, "quick", seed=0, console=Console(quiet=True), jobs=2)
    assert second["results"] == results


def binomial_tail(successes: int, trials: int, chance: float) -> float:
    """P(X >= successes) for X ~ Binomial(trials, chance)."""
    return sum(math.comb(trials, k) * chance**k * (1 - chance) ** (trials - k) for k in range(successes, trials + 1))


def test_binomial_tail() -> None:
    assert binomial_tail(0, 10, 0.25) == pytest.approx(1.0)
    assert binomial_tail(2, 2, 0.5) == pytest.approx(0.25)
    assert binomial_tail(1, 3, 0.5) == pytest.approx(0.875)


def test_composed_model_beats_chance_on_mcub(demo: tuple[Path, dict]) -> None:
    """Four options: chance is 25%. Over MCUB-4 and the four MCUB-3 files, DAMC must be right more often than
    a guesser would be with probability 1/1000."""
    results = demo[1]["results"]["DAMC (linear, 1/M)"]
    items = PROFILES[DEMO_PROFILES["quick"].world].mcub_test
    correct = round(sum(results[task] * items for task in MCUB_TASKS))
    assert binomial_tail(correct, items * len(MCUB_TASKS), 0.25) < 1e-3, results
