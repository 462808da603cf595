"""The quick demo end to end (in CI), run as a user runs it: every method on every task, a cached rerun, a
composed model that beats chance on MCUB-world, and output free of warnings and tracebacks."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from rich.console import Console

from mmcompose.experiment.demo import run_demo
from mmcompose.experiment.plan import CLAIM_METHODS, MCUB_TASKS, NAIVE, demo_plan
from mmcompose.experiment.plan import PROFILES as DEMO_PROFILES
from mmcompose.world import PROFILES
from tests.experiment.quick_demo import DemoRun

NOISE = re.compile(r"Warning\b|\[WARNING\]|^WARNING\b|warnings\.warn|Traceback \(most recent call last\)")
"""A Python warning (`FutureWarning: ...`, `UserWarning: ...`), a logged warning, or a traceback."""


def noise(stdout: str, stderr: str) -> list[str]:
    """The lines of a successful demo's output that the demo itself does not print.

    The demo prints its progress, table and claims to stdout; on success it writes nothing to stderr. Python's
    warnings, tracebacks and the log records of every library (stdlib `logging`'s fallback handler,
    transformers' and accelerate's handlers) go to stderr, whatever their wording: so every line there is
    noise, prefixed or not ("Could not load the CPU kernel ...", "Some parameters are on the meta device ...").
    On stdout, where a library could only `print`, a line that reads as a warning or a traceback is."""
    return ([f"stderr: {line}" for line in stderr.splitlines() if line.strip()]
            + [f"stdout: {line}" for line in stdout.splitlines() if NOISE.search(line)])


def test_noise_is_any_stderr_line_and_warnings_on_stdout() -> None:
    table = "┃ method ┃ MCUB-4 ┃\n  train shared-image: 12.0s"
    assert noise(table, "") == []
    assert noise(table, "\n") == []
    assert noise(table, "Could not load the CPU kernel for 4-bit matmul\n") == [
        "stderr: Could not load the CPU kernel for 4-bit matmul"]
    assert noise(table, "Some parameters are on the meta device because they were offloaded to the disk.") != []
    assert noise("/x.py:3: FutureWarning: old\n" + table, "") == ["stdout: /x.py:3: FutureWarning: old"]


@pytest.fixture(scope="module")
def quick_demo(quick_demo_run: DemoRun) -> tuple[Path, dict, str, str]:
    """The run directory, results, stdout and stderr of the quick demo the session started."""
    code, stdout, stderr = quick_demo_run.wait()
    assert code == 0, (stdout + stderr)[-3000:]
    return quick_demo_run.out, json.loads((quick_demo_run.out / "results.json").read_text()), stdout, stderr


@pytest.mark.e2e
def test_every_method_on_every_task_and_a_cached_rerun(quick_demo: tuple[Path, dict, str, str],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    out, first, _, _ = quick_demo
    results = first["results"]
    assert {"naive-linear", "damc-linear", "joint", "tool", "text-oracle"} <= results.keys()
    for scores in results.values():
        assert all(v is None or 0.0 <= v <= 1.0 for v in scores.values())
    assert (out / "results.png").stat().st_size > 0
    assert {c["verdict"] for c in first["claims"]} <= {"holds", "does not hold", "undecided"}
    # what the numbers depend on besides code and seed: the CPU and the numerical libraries' versions
    assert first["environment"]["torch"] == torch.__version__ and first["environment"]["cpu"]
    # every evaluation is timed, under its method id
    assert {f"evaluate {m.id}" for m in demo_plan("quick").methods} <= first["timings"].keys()

    def no_loading(*args, **kwargs):
        raise AssertionError("a cached rerun must not load any model")

    monkeypatch.setattr("mmcompose.experiment.demo.load_checkpoint", no_loading)
    monkeypatch.setattr("mmcompose.experiment.demo.MultimodalLLM.from_base", no_loading)
    second = run_demo(out, demo_plan("quick"), seed=0, console=Console(quiet=True), jobs=2)
    assert second["results"] == results and second["claims"] == first["claims"]
    # `--claims-only` reads the same run directory: a subset of the methods, the same claims, nothing reloaded
    claims_only = run_demo(out, demo_plan("quick").claims_only(), seed=0, console=Console(quiet=True), jobs=2)
    assert set(claims_only["results"]) == set(CLAIM_METHODS) and claims_only["claims"] == first["claims"]


@pytest.mark.e2e
def test_the_output_carries_no_warning_or_traceback(quick_demo: tuple[Path, dict, str, str]) -> None:
    found = noise(quick_demo[2], quick_demo[3])
    assert not found, "\n".join(found[:10])


@pytest.mark.e2e
def test_the_results_table_is_written_whole(quick_demo: tuple[Path, dict, str, str]) -> None:
    """Not a terminal: the table keeps its last column (single-modality `point`) instead of being cut at 80."""
    header = next(line for line in quick_demo[2].splitlines() if "method" in line and "MCUB-4" in line)
    assert header.rstrip().endswith("point ┃")


def binomial_tail(successes: int, trials: int, chance: float) -> float:
    """P(X >= successes) for X ~ Binomial(trials, chance)."""
    return sum(math.comb(trials, k) * chance**k * (1 - chance) ** (trials - k) for k in range(successes, trials + 1))


def test_binomial_tail() -> None:
    assert binomial_tail(0, 10, 0.25) == pytest.approx(1.0)
    assert binomial_tail(2, 2, 0.5) == pytest.approx(0.25)
    assert binomial_tail(1, 3, 0.5) == pytest.approx(0.875)


@pytest.mark.e2e
def test_composed_model_beats_chance_on_mcub(quick_demo: tuple[Path, dict, str, str]) -> None:
    """Four options: chance is 25%. Over MCUB-4 and the four MCUB-3 files, a composed model (NaiveMC, linear) must
    be right more often than a guesser would be with probability 1/1000: composition works end to end.

    Not DAMC: how DAMC does against NaiveMC is what the demo's claims measure and report, with intervals; a
    pipeline check must not turn that result into a pass or fail."""
    results = quick_demo[1]["results"][NAIVE]
    items = PROFILES[DEMO_PROFILES["quick"].world].mcub_test
    correct = round(sum(results[task] * items for task in MCUB_TASKS))
    assert binomial_tail(correct, items * len(MCUB_TASKS), 0.25) < 1e-3, results
