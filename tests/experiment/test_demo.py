"""The quick demo end to end: every method on every task, cached rerun, and the paper's claim (slow)."""

from __future__ import annotations

from pathlib import Path

import pytest
from rich.console import Console

from mmcompose.experiment.demo import run_demo

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("demo") / "run"
    return out, run_demo(out, "quick", seed=0, console=Console(quiet=True))


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
    second = run_demo(out, "quick", seed=0, console=Console(quiet=True))
    assert second["results"] == results


@pytest.mark.xfail(strict=True, reason="issue 4: on the quick profile every method is still at chance (the base "
                                       "LLM does not learn multiple-choice QA in its budget)")
def test_composed_model_beats_chance_on_mcub4(demo: tuple[Path, dict]) -> None:
    results = demo[1]["results"]
    assert results["DAMC (linear, 1/M)"]["MCUB-4"] > 0.35
