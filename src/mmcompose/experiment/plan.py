"""The demo's experiment as data: profiles, training runs, compositions, searches, evaluated methods and claims.

Everything is keyed by a short id (`damc-linear`, `image-single`): ids name directories and JSON keys; the
display labels (`DAMC (linear, 1/M)`) appear only in tables and plots. The orchestrator (`experiment.demo`)
turns a `Plan` into files and never decides what to run.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

from mmcompose.data import names
from mmcompose.errors import MMComposeError
from mmcompose.train.base_llm import BASE_PROFILES
from mmcompose.train.trainer import LearningRates
from mmcompose.world import MODALITIES
from mmcompose.world import PROFILES as WORLD_PROFILES


@dataclass(frozen=True)
class DemoProfile:
    world: str
    base: str
    encoder_steps: int
    stage1_steps: int
    stage2_steps: int
    joint_steps: int
    rank: int
    batch_size: int
    search_rounds: int
    search_limit: int  # validation samples per MCUB file used by the lambda search
    agreement_prompts: int  # single-modality prompts per modality for the label-free search


PROFILES: dict[str, DemoProfile] = {
    # ~9 min cold on 2 cores (base LLM ~2 min). The joint run gets half the single runs' combined steps: the full
    # 1200 would add ~1 min. 150-step single runs at rank 8 gave weaker single models (65-84% on their own tests
    # instead of 73-93%) and a DAMC that did not beat the single models beyond noise (stage 1 was 150 steps too).
    "default": DemoProfile(world="small", base="small", encoder_steps=300, stage1_steps=300, stage2_steps=300,
                           joint_steps=600, rank=16, batch_size=16, search_rounds=1, search_limit=12,
                           agreement_prompts=12),
    # CI: the default's world and base LLM, about half the steps and rank (~2 min less).
    "quick": DemoProfile(world="small", base="small", encoder_steps=300, stage1_steps=100, stage2_steps=150,
                         joint_steps=300, rank=8, batch_size=16, search_rounds=1, search_limit=12,
                         agreement_prompts=12),
    # More entities, renders, test items and steps, and a larger base LLM: tighter numbers, well over 10 min.
    "large": DemoProfile(world="large", base="large", encoder_steps=300, stage1_steps=300, stage2_steps=300,
                         joint_steps=1200, rank=16, batch_size=16, search_rounds=1, search_limit=50,
                         agreement_prompts=48),
}

# The encoders stay frozen after their LLM-free pretraining, as LLaVA-style MLLMs keep a pretrained encoder
# frozen. Measured on the small world (image, 150 stage-2 steps, held-out renders): every group at 1e-3 with the
# encoder trained 28% on the single-modality test; encoder frozen 35%; connector 1e-4 and deltas 3e-3 55%.
# Stage 2 keeps the deltas' rate and sets the connector's to a tenth of it, the ratio of ModelCompose's vision
# scripts (2e-4 / 2e-5), for NaiveMC and DAMC alike; boundary tokens train in the deltas' (main) group there.
LEARNING_RATES = {
    "pretrain": LearningRates(encoder=1e-3, connector=3e-3, boundary=3e-3, deltas=0.0),
    "instruct": LearningRates(encoder=0.0, connector=3e-4, boundary=3e-3, deltas=3e-3),
}


@dataclass(frozen=True)
class DecoupledRecipe:
    """How the `decoupled` (DAMC) runs train, beside the `shared` (NaiveMC) runs, which every recipe shares.

    `official` is what ModelCompose's released DAMC scripts do, in roles: stage 1 trains the connector only
    (no boundary tokens; the NaiveMC and DAMC runs start from the same stage-1 run); stage 2 adds 5 prefix and
    5 suffix tokens per modality, created as zeros and trained in the main optimizer group (the modality delta's
    rate); the language delta trains in the connector's group, at the connector's rate (a tenth of the modality
    delta's). `one-rate`: both deltas in one group at one rate, no boundary tokens. The boundary-token ablation
    keeps the official rates: `boundary-none` (no tokens) and `boundary-stage1` (tokens trained from stage 1 on,
    beside the connector, in separate stage-1 runs of the decoupled models; then in stage 2's main group).
    """

    language_with_connector: bool  # False: the language delta trains with the modality delta, at its rate
    boundary_tokens: int  # prefix tokens, and as many suffix tokens, per modality
    boundary_from_stage1: bool = False  # True: stage-1 runs of their own train them; False: fresh (zero) in stage 2


RECIPES = {"official": DecoupledRecipe(language_with_connector=True, boundary_tokens=5),
           "one-rate": DecoupledRecipe(language_with_connector=False, boundary_tokens=0),
           "boundary-none": DecoupledRecipe(language_with_connector=True, boundary_tokens=0),
           "boundary-stage1": DecoupledRecipe(language_with_connector=True, boundary_tokens=5,
                                              boundary_from_stage1=True)}


@dataclass(frozen=True)
class TrainingRun:
    """One training run: its id (directory under `train/`), data files, the runs it starts from, its rates."""

    id: str
    modalities: tuple[str, ...]
    strategy: str
    data: tuple[str, ...]
    stage: Literal["pretrain", "instruct"]
    steps: int
    start_from: tuple[str, ...]
    lr: LearningRates
    boundary_tokens: int = 0  # fresh prefix (and suffix) tokens per modality; 0: none, or the start run's


@dataclass(frozen=True)
class Composition:
    """A composition of the four single-modality models of one strategy (`shared` or `decoupled`)."""

    id: str
    strategy: str
    method: Literal["naive", "damc"]
    merge: str = "linear"
    sparsified: bool = False  # TIES / DARE: density 0.5, seeded with the demo's seed


@dataclass(frozen=True)
class Search:
    """DAMC's lambda search over the decoupled models, by `criterion`; its result is composition `id`."""

    id: str
    criterion: Literal["validation", "agreement"]


MCUB_TASKS = names.MCUB_TASKS
TASKS = [*MCUB_TASKS, *MODALITIES]


@dataclass(frozen=True)
class Method:
    """A row of the results table, as plain data (worker processes evaluate it).

    `model`: one checkpoint answers (given only the inputs of `only`, if set); `tool`: one captioning
    checkpoint per modality (in `MODALITIES` order) and the base LLM; `text`: the base LLM on the text twins
    of the tasks (entity names in place of media). `sources` are checkpoint paths relative to the run
    directory (`train/RUN/model`, `composed/COMPOSITION`)."""

    id: str
    label: str
    kind: Literal["model", "tool", "text"]
    sources: tuple[str, ...] = ()
    only: tuple[str, ...] | None = None
    tasks: tuple[str, ...] = tuple(TASKS)


DAMC, NAIVE, SEARCHED = "damc-linear", "naive-linear", "damc-search-val"
"""The methods the paper's claims compare: uniform-lambda DAMC, NaiveMC (both linear), searched-lambda DAMC."""


def single_id(modality: str) -> str:
    return f"{modality}-single"


CLAIM_METHODS = (*(single_id(m) for m in MODALITIES), NAIVE, DAMC, SEARCHED)
"""Every method the paper's claims read (`experiment.claims`)."""


def trained(run: str) -> str:
    """The final checkpoint of a training run, relative to the run directory."""
    return f"train/{run}/model"


@dataclass(frozen=True)
class Plan:
    profile: str
    settings: DemoProfile
    recipe: str
    runs: tuple[TrainingRun, ...]  # every run after the runs it starts from; the order is the demo's priority
    compositions: tuple[Composition, ...]
    searches: tuple[Search, ...]
    methods: tuple[Method, ...]

    def identity(self) -> dict[str, Any]:
        """What a cached run directory must share with this plan to be reused: the recipe's definition and the
        learning rates included, so a directory trained under an earlier definition is never taken for this one."""
        return {"profile": self.profile, "recipe": self.recipe, "settings": asdict(self.settings),
                "recipe_settings": asdict(RECIPES[self.recipe]),
                "learning_rates": {stage: rates.model_dump() for stage, rates in LEARNING_RATES.items()}}

    @property
    def name(self) -> str:
        """The profile's name, plus the world and base LLM where they override the profile's."""
        named = PROFILES[self.profile]
        return "-".join([self.profile, *(f"{value}-{part}" for part, value, default in
                                         (("world", self.settings.world, named.world),
                                          ("base", self.settings.base, named.base)) if value != default)])

    def labels(self) -> dict[str, str]:
        return {method.id: method.label for method in self.methods}

    def claims_only(self) -> Plan:
        """Only what the paper's claims compare: the single models, NaiveMC and DAMC (linear) and DAMC with
        searched lambda, and the training runs they need; no joint run, TIES/DARE, label-free search or
        tool and text baselines. Its identity is the whole plan's: every step it keeps is the whole plan's
        step, so the two share run directories."""
        methods = tuple(m for m in self.methods if m.id in CLAIM_METHODS)
        kept = {m.id for m in methods}
        compositions = tuple(c for c in self.compositions if c.id in kept)
        searches = tuple(s for s in self.searches if s.id in kept)
        needed = {source.split("/")[1] for m in methods for source in m.sources if source.startswith("train/")}
        needed |= {f"{m}-{c.strategy}" for c in compositions for m in MODALITIES}
        needed |= {f"{m}-decoupled" for m in MODALITIES} if searches else set()
        for run in reversed(self.runs):  # a run's starting points come before it
            if run.id in needed:
                needed |= set(run.start_from)
        runs = tuple(run for run in self.runs if run.id in needed)
        return replace(self, runs=runs, compositions=compositions, searches=searches, methods=methods)


COMPOSITIONS = (
    Composition("naive-linear", "shared", "naive"),
    Composition("naive-ties", "shared", "naive", "ties", sparsified=True),
    Composition("naive-dare", "shared", "naive", "dare_linear", sparsified=True),
    Composition("damc-linear", "decoupled", "damc"),
    Composition("damc-ties", "decoupled", "damc", "ties", sparsified=True),
)
SEARCHES = (Search("damc-search-val", "validation"), Search("damc-search-agree", "agreement"))
COMPOSITION_LABELS = {
    "naive-linear": "NaiveMC (linear)", "naive-ties": "NaiveMC (TIES)", "naive-dare": "NaiveMC (DARE)",
    "damc-linear": "DAMC (linear, 1/M)", "damc-ties": "DAMC (TIES)",
    "damc-search-val": "DAMC (searched λ, val)", "damc-search-agree": "DAMC (searched λ, label-free)",
}


def demo_plan(profile: str, recipe: str = "official", *, world: str | None = None,
              base: str | None = None) -> Plan:
    """The demo's experiment for a profile and a decoupled recipe; `world` and `base` replace the profile's
    world and base LLM (the other settings stay the profile's)."""
    if profile not in PROFILES:
        raise MMComposeError(f"unknown demo profile {profile!r}; choose one of {', '.join(PROFILES)}")
    if recipe not in RECIPES:
        raise MMComposeError(f"unknown decoupled recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
    if world is not None and world not in WORLD_PROFILES:
        raise MMComposeError(f"unknown world {world!r}; choose one of {', '.join(WORLD_PROFILES)}")
    if base is not None and base not in BASE_PROFILES:
        raise MMComposeError(f"unknown base LLM {base!r}; choose one of {', '.join(BASE_PROFILES)}")
    s = replace(PROFILES[profile], world=world or PROFILES[profile].world, base=base or PROFILES[profile].base)
    decoupled = RECIPES[recipe]
    pretrain, instruct = LEARNING_RATES["pretrain"], LEARNING_RATES["instruct"]
    stage1 = [TrainingRun(f"{m}-stage1", (m,), "connector-only", (names.caption_file(m),), "pretrain",
                          s.stage1_steps, (), pretrain) for m in MODALITIES]
    first_of = {m: f"{m}-stage1" for m in MODALITIES}
    if decoupled.boundary_tokens and decoupled.boundary_from_stage1:  # the ablation's own stage-1 runs
        stage1 += [TrainingRun(f"{m}-stage1-boundary", (m,), "connector-only", (names.caption_file(m),), "pretrain",
                               s.stage1_steps, (), pretrain, boundary_tokens=decoupled.boundary_tokens)
                   for m in MODALITIES]
        first_of = {m: f"{m}-stage1-boundary" for m in MODALITIES}
    decoupled_lr = instruct.model_copy(update={"language": instruct.connector}) \
        if decoupled.language_with_connector else instruct
    shared = [TrainingRun(f"{m}-shared", (m,), "shared", (names.instruct_file(m),), "instruct", s.stage2_steps,
                          (f"{m}-stage1",), instruct) for m in MODALITIES]
    added = 0 if decoupled.boundary_from_stage1 else decoupled.boundary_tokens  # fresh in stage 2
    singles = [TrainingRun(f"{m}-decoupled", (m,), "decoupled", (names.instruct_file(m),), "instruct",
                           s.stage2_steps, (first_of[m],), decoupled_lr, boundary_tokens=added) for m in MODALITIES]
    joint = TrainingRun("joint-decoupled", MODALITIES, "decoupled", tuple(names.instruct_file(m) for m in MODALITIES),
                        "instruct", s.joint_steps, tuple(first_of[m] for m in MODALITIES), decoupled_lr,
                        boundary_tokens=added)
    # The demo starts each run once the runs it starts from have finished, taking the first ready run in this order
    # when a core frees: the joint run first, as it is the longest (153 s of a default demo's 628 process-seconds
    # of stage 2 on a 2-core Xeon), then the decoupled runs (59-79 s, the shared ones 38-54 s), so that no long
    # run is left to finish alone while the other core idles.
    runs = (*stage1, joint, *singles, *shared)

    methods = [Method(single_id(m), f"{m}-LLM (own input only)", "model", (trained(f"{m}-decoupled"),), only=(m,),
                      tasks=tuple(t for t in TASKS if m in names.task_modalities(t))) for m in MODALITIES]
    methods += [Method(c.id, COMPOSITION_LABELS[c.id], "model", (f"composed/{c.id}",))
                for c in (*COMPOSITIONS, *SEARCHES)]
    methods += [Method("joint", "joint training (upper ref.)", "model", (trained("joint-decoupled"),)),
                Method("tool", "tool pipeline (captions -> LLM)", "tool",
                       tuple(trained(f"{m}-decoupled") for m in MODALITIES), tasks=tuple(MCUB_TASKS)),
                Method("text-oracle", "base LLM with entity names (text oracle)", "text", tasks=tuple(MCUB_TASKS))]
    return Plan(profile, s, recipe, runs, COMPOSITIONS, SEARCHES, tuple(methods))
