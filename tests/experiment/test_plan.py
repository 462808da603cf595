"""The demo's plan: ids that resolve, the decoupled recipes, NaiveMC runs that do not depend on the recipe,
world and base LLM overrides, the claims-only subset, and the orchestrator's directories and command-line checks."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from mmcompose.cli import app
from mmcompose.errors import MMComposeError
from mmcompose.experiment.demo import Demo, seed_directories
from mmcompose.experiment.plan import CLAIM_METHODS, TASKS, demo_plan
from mmcompose.experiment.report import print_whole, results_table
from mmcompose.world import MODALITIES


def _runs(recipe: str) -> dict:
    return {run.id: run for run in demo_plan("quick", recipe).runs}


@pytest.mark.parametrize("recipe", ["official", "one-rate"])
def test_every_id_resolves_and_every_run_starts_from_an_earlier_run(recipe: str) -> None:
    plan = demo_plan("default", recipe)
    finished: set[str] = set()
    for run in plan.runs:
        assert set(run.start_from) <= finished
        finished.add(run.id)
    composed = {c.id for c in plan.compositions} | {s.id for s in plan.searches}
    for method in plan.methods:
        for source in method.sources:
            kind, name, *_ = source.split("/")
            assert (kind == "train" and name in finished) or (kind == "composed" and name in composed), source
    assert len({m.id for m in plan.methods}) == len(plan.methods) == len(set(plan.labels().values()))
    assert all(set(m.tasks) <= set(TASKS) for m in plan.methods)


# The released scripts' DAMC recipe in roles (run_finetune_vision_damc.sh with train_multimodal.py and
# llava_trainer.py): no boundary tokens in stage 1 (run_pretrain_*.sh pass no --local_prefix_tokens); NaiveMC and
# DAMC stage 2 start from the same stage-1 projector (--pretrain_mm_mlp_adapter); DAMC adds 5 + 5 tokens in
# stage 2, in the main group (--learning_rate 2e-4); --mm_language_lr puts the language adapter in the projector's
# group (--mm_projector_lr 2e-5), so the language delta trains at the connector's rate, a tenth of the main one.
OFFICIAL_ROLES = {"stage1_boundary_tokens": 0, "stage2_boundary_tokens": 5, "boundary": "deltas",
                  "language": "connector", "connector_to_deltas": 2e-5 / 2e-4}


def test_the_official_recipe_is_the_released_scripts_in_roles() -> None:
    runs = _runs("official")
    for m in MODALITIES:
        stage1, shared, decoupled = runs[f"{m}-stage1"], runs[f"{m}-shared"], runs[f"{m}-decoupled"]
        assert stage1.boundary_tokens == OFFICIAL_ROLES["stage1_boundary_tokens"]
        assert shared.start_from == decoupled.start_from == (f"{m}-stage1",)  # one stage-1 run for both methods
        assert decoupled.boundary_tokens == OFFICIAL_ROLES["stage2_boundary_tokens"] and shared.boundary_tokens == 0
        assert decoupled.lr.boundary == getattr(decoupled.lr, OFFICIAL_ROLES["boundary"])
        assert decoupled.lr.language == getattr(decoupled.lr, OFFICIAL_ROLES["language"])
        for run in (shared, decoupled):
            assert run.lr.connector == pytest.approx(run.lr.deltas * OFFICIAL_ROLES["connector_to_deltas"])
    assert not any(run.id.endswith("-boundary") for run in runs.values())
    assert runs["joint-decoupled"].start_from == tuple(f"{m}-stage1" for m in MODALITIES)
    assert runs["joint-decoupled"].boundary_tokens == 5


def test_the_recipes_differ_only_in_the_decoupled_runs() -> None:
    official = _runs("official")
    for recipe in ("one-rate", "boundary-none", "boundary-stage1"):
        other = _runs(recipe)
        for m in MODALITIES:
            assert other[f"{m}-shared"] == official[f"{m}-shared"] and other[f"{m}-stage1"] == official[f"{m}-stage1"]
    one_rate = _runs("one-rate")
    for m in MODALITIES:
        assert one_rate[f"{m}-decoupled"].lr.language is None and one_rate[f"{m}-decoupled"].boundary_tokens == 0
        assert one_rate[f"{m}-decoupled"].lr.deltas == official[f"{m}-decoupled"].lr.deltas


def test_the_boundary_token_ablation_changes_only_the_tokens() -> None:
    official, none, stage1 = _runs("official"), _runs("boundary-none"), _runs("boundary-stage1")
    for m in MODALITIES:
        decoupled = official[f"{m}-decoupled"]
        assert none[f"{m}-decoupled"].lr == stage1[f"{m}-decoupled"].lr == decoupled.lr
        assert none[f"{m}-decoupled"].start_from == (f"{m}-stage1",) and none[f"{m}-decoupled"].boundary_tokens == 0
        assert stage1[f"{m}-decoupled"].start_from == (f"{m}-stage1-boundary",)
        assert stage1[f"{m}-decoupled"].boundary_tokens == 0  # carried from its stage-1 run
        assert stage1[f"{m}-stage1-boundary"].boundary_tokens == 5
        assert stage1[f"{m}-stage1-boundary"].lr == official[f"{m}-stage1"].lr
    assert none["joint-decoupled"].boundary_tokens == 0
    assert stage1["joint-decoupled"].start_from == tuple(f"{m}-stage1-boundary" for m in MODALITIES)


def test_a_changed_recipe_definition_does_not_reuse_old_run_directories() -> None:
    assert demo_plan("quick", "official").identity() != demo_plan("quick", "boundary-none").identity()
    identity = demo_plan("quick", "official").identity()
    assert identity["recipe_settings"]["boundary_tokens"] == 5 and identity["learning_rates"]["instruct"]


@pytest.mark.parametrize("recipe", ["official", "one-rate"])
def test_claims_only_keeps_what_the_claims_read_and_the_runs_behind_it(recipe: str) -> None:
    whole = demo_plan("default", recipe)
    plan = whole.claims_only()
    assert plan.identity() == whole.identity() and plan.name == whole.name  # the two share run directories
    assert [m.id for m in plan.methods] == list(CLAIM_METHODS)
    assert [c.id for c in plan.compositions] == ["naive-linear", "damc-linear"]
    assert [s.id for s in plan.searches] == ["damc-search-val"]
    runs = {run.id for run in plan.runs}
    assert runs == {f"{m}-{kind}" for m in MODALITIES for kind in ("stage1", "shared", "decoupled")}
    finished: set[str] = set()
    for run in plan.runs:
        assert set(run.start_from) <= finished
        finished.add(run.id)


@pytest.mark.parametrize("recipe", ["official", "boundary-stage1"])
def test_the_demo_starts_each_step_after_the_steps_whose_outputs_it_reads(recipe: str, tmp_path: Path) -> None:
    plan = demo_plan("default", recipe)
    demo = Demo(tmp_path, plan, 0, Console(file=io.StringIO()))
    steps = [*plan.runs, *plan.compositions, *plan.searches, *plan.methods]
    needs = {demo.label(step): demo.needs(step) for step in steps}
    assert len(needs) == len(steps) and set().union(*needs.values()) <= needs.keys()
    stage1 = "stage1-boundary" if recipe == "boundary-stage1" else "stage1"
    assert needs["train image-stage1"] == set()
    assert needs["train image-shared"] == {"train image-stage1"}
    assert needs["train image-decoupled"] == {f"train image-{stage1}"}
    assert needs["train joint-decoupled"] == {f"train {m}-{stage1}" for m in MODALITIES}
    assert needs["compose naive-linear"] == needs["compose naive-dare"] == {f"train {m}-shared" for m in MODALITIES}
    assert needs["compose damc-ties"] == needs["search damc-search-agree"] == {
        f"train {m}-decoupled" for m in MODALITIES}
    assert needs["evaluate image-single"] == {"train image-decoupled"}
    assert needs["evaluate naive-ties"] == {"compose naive-ties"}
    assert needs["evaluate damc-search-val"] == {"search damc-search-val"}
    assert needs["evaluate joint"] == {"train joint-decoupled"}
    assert needs["evaluate tool"] == {f"train {m}-decoupled" for m in MODALITIES}
    assert needs["evaluate text-oracle"] == set()  # the base LLM, built before every step


def test_world_and_base_replace_the_profiles_and_name_the_plan() -> None:
    plan = demo_plan("default", world="large")
    assert (plan.settings.world, plan.settings.base, plan.name) == ("large", "small", "default-large-world")
    both = demo_plan("default", world="large", base="large")
    assert both.name == "default-large-world-large-base" and both.identity() != plan.identity()
    assert both.settings.stage2_steps == demo_plan("default").settings.stage2_steps
    assert demo_plan("large", world="large").name == "large"  # the profile's own world is no override
    assert seed_directories(plan.name, [1], None)[0] == {1: Path("runs/demo-default-large-world-s1")}


def test_unknown_profile_or_recipe_is_refused() -> None:
    with pytest.raises(MMComposeError, match="unknown demo profile 'huge'"):
        demo_plan("huge")
    with pytest.raises(MMComposeError, match="unknown decoupled recipe 'fast'; choose one of official, one-rate, "
                                              "boundary-none, boundary-stage1"):
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
