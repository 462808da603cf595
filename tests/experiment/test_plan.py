"""The demo's plan: ids that resolve, the two decoupled recipes, NaiveMC runs that do not depend on the recipe,
world and base LLM overrides, the claims-only subset, and the orchestrator's directories and command-line checks."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from mmcompose.cli import app
from mmcompose.errors import MMComposeError
from mmcompose.experiment.demo import seed_directories
from mmcompose.experiment.plan import CLAIM_METHODS, TASKS, demo_plan
from mmcompose.experiment.report import print_whole, results_table
from mmcompose.world import MODALITIES


def _runs(recipe: str) -> dict:
    return {run.id: run for wave in demo_plan("quick", recipe).waves for run in wave}


@pytest.mark.parametrize("recipe", ["official", "one-rate"])
def test_every_id_resolves_and_every_run_starts_from_an_earlier_wave(recipe: str) -> None:
    plan = demo_plan("default", recipe)
    finished: set[str] = set()
    for wave in plan.waves:
        assert all(set(run.start_from) <= finished for run in wave)
        finished |= {run.id for run in wave}
    composed = {c.id for c in plan.compositions} | {s.id for s in plan.searches}
    for method in plan.methods:
        for source in method.sources:
            kind, name, *_ = source.split("/")
            assert (kind == "train" and name in finished) or (kind == "composed" and name in composed), source
    assert len({m.id for m in plan.methods}) == len(plan.methods) == len(set(plan.labels().values()))
    assert all(set(m.tasks) <= set(TASKS) for m in plan.methods)


def test_the_official_recipe_changes_only_the_decoupled_runs() -> None:
    official, one_rate = _runs("official"), _runs("one-rate")
    for m in MODALITIES:
        assert official[f"{m}-shared"] == one_rate[f"{m}-shared"]  # NaiveMC: the same run under both
        assert official[f"{m}-stage1"] == one_rate[f"{m}-stage1"]
        new, old = official[f"{m}-decoupled"], one_rate[f"{m}-decoupled"]
        assert new.lr.language == pytest.approx(new.lr.deltas / 10) and old.lr.language is None
        assert new.lr.deltas == old.lr.deltas and new.lr.connector == old.lr.connector
        assert new.start_from == (f"{m}-stage1-boundary",) and old.start_from == (f"{m}-stage1",)
        assert official[f"{m}-stage1-boundary"].boundary_tokens == 5
    assert not any(run.boundary_tokens for run in one_rate.values())
    assert official["joint-decoupled"].start_from == tuple(f"{m}-stage1-boundary" for m in MODALITIES)


@pytest.mark.parametrize("recipe", ["official", "one-rate"])
def test_claims_only_keeps_what_the_claims_read_and_the_runs_behind_it(recipe: str) -> None:
    whole = demo_plan("default", recipe)
    plan = whole.claims_only()
    assert plan.identity() == whole.identity() and plan.name == whole.name  # the two share run directories
    assert [m.id for m in plan.methods] == list(CLAIM_METHODS)
    assert [c.id for c in plan.compositions] == ["naive-linear", "damc-linear"]
    assert [s.id for s in plan.searches] == ["damc-search-val"]
    runs = {run.id for wave in plan.waves for run in wave}
    boundary = {f"{m}-stage1-boundary" for m in MODALITIES} if recipe == "official" else set()
    assert runs == {f"{m}-{kind}" for m in MODALITIES for kind in ("stage1", "shared", "decoupled")} | boundary
    finished: set[str] = set()
    for wave in plan.waves:
        assert all(set(run.start_from) <= finished for run in wave)
        finished |= {run.id for run in wave}


def test_world_and_base_replace_the_profiles_and_name_the_plan() -> None:
    plan = demo_plan("default", world="large")
    assert (plan.settings.world, plan.settings.base, plan.name) == ("large", "small", "default-large-world")
    both = demo_plan("default", world="large", base="large")
    assert both.name == "default-large-world-large-base" and both.identity() != plan.identity()
    assert both.settings.stage2_steps == demo_plan("default").settings.stage2_steps
    assert demo_plan("large", world="large").name == "large"  # the profile's own world is no override
    assert seed_directories(plan.name, [1], None)[0] == {1: Path("runs/demo-default-large-world-s1")}


def test_the_ablation_recipes_take_the_official_one_apart() -> None:
    official, lr_only, stage2 = _runs("official"), _runs("lr-only"), _runs("boundary-stage2")
    for m in MODALITIES:
        decoupled = official[f"{m}-decoupled"]
        assert lr_only[f"{m}-decoupled"].lr == stage2[f"{m}-decoupled"].lr == decoupled.lr
        assert lr_only[f"{m}-decoupled"].start_from == stage2[f"{m}-decoupled"].start_from == (f"{m}-stage1",)
        assert (lr_only[f"{m}-decoupled"].boundary_tokens, stage2[f"{m}-decoupled"].boundary_tokens) == (0, 5)
        assert f"{m}-stage1-boundary" not in lr_only and f"{m}-stage1-boundary" not in stage2
    assert stage2["joint-decoupled"].boundary_tokens == 5 and lr_only["joint-decoupled"].boundary_tokens == 0


def test_unknown_profile_or_recipe_is_refused() -> None:
    with pytest.raises(MMComposeError, match="unknown demo profile 'huge'"):
        demo_plan("huge")
    with pytest.raises(MMComposeError, match="unknown decoupled recipe 'fast'; choose one of official, one-rate"):
        demo_plan("quick", "fast")
    with pytest.raises(MMComposeError, match="unknown world 'huge'; choose one of"):
        demo_plan("quick", world="huge")
    with pytest.raises(MMComposeError, match="unknown base LLM 'xl'; choose one of"):
        demo_plan("quick", base="xl")


def test_seed_directories() -> None:
    assert seed_directories("quick", [0], None) == ({0: Path("runs/demo-quick-s0")}, Path("runs/demo-quick-s0"))
    assert seed_directories("quick", [0, 2], None) == (
        {0: Path("runs/demo-quick-s0"), 2: Path("runs/demo-quick-s2")}, Path("runs/demo-quick-seeds-0-2"))
    assert seed_directories("quick", [1], Path("x")) == ({1: Path("x")}, Path("x"))
    assert seed_directories("quick", [1, 3], Path("x")) == ({1: Path("x/s1"), 3: Path("x/s3")}, Path("x"))


@pytest.mark.parametrize(("option", "message"), [(["--seeds", "0,a"], "expected integers"),
                                                 (["--seeds", "1,1"], "distinct seeds"),
                                                 (["--world", "huge"], "unknown world 'huge'"),
                                                 (["--base", "xl"], "unknown base LLM 'xl'")])
def test_bad_options_are_one_line_errors(option: list[str], message: str, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["demo", "--profile", "quick", *option, "-o", str(tmp_path / "d")])
    assert result.exit_code == 2 and message in result.output
    assert not (tmp_path / "d").exists()


def test_a_table_is_written_whole_when_the_console_is_not_a_terminal() -> None:
    plan = demo_plan("quick")
    results = {m.label: dict.fromkeys(TASKS, 0.5) for m in plan.methods}
    screen = io.StringIO()
    console = Console(file=screen, force_terminal=False, width=80)
    print_whole(console, results_table(results, list(TASKS), "accuracy"))
    header = next(line for line in screen.getvalue().splitlines() if "method" in line)
    assert header.rstrip().endswith("point ┃") and len(header) > 80
    assert console.width == 80  # the console is left as it was
