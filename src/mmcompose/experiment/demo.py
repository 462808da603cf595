"""`mmcompose demo`: the paper's experiment on the synthetic world, end to end, cached step by step.

world -> base LLM (text only) -> per modality: stage 1 (connector pretraining) and stage 2 (instruction
tuning, `shared` and `decoupled`) -> a jointly trained model (upper reference) -> compositions (NaiveMC with
linear / TIES / DARE, DAMC with uniform and searched lambda) -> evaluation on MCUB-world (4 and the four
3-modality subsets) and single-modality tests -> table, JSON, PNG.

Every step writes its output atomically and is skipped when that output exists, so an interrupted demo
resumes, and a second run only re-renders the report.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from mmcompose.checkpoint import load_checkpoint
from mmcompose.compose.config import CompositionConfig, parse_config
from mmcompose.compose.engine import compose
from mmcompose.errors import MMComposeError
from mmcompose.eval.benchmark import Sample, load_benchmark
from mmcompose.eval.runner import Predictor
from mmcompose.experiment.evaluate import evaluate, load_tasks
from mmcompose.experiment.predict import model_predictor
from mmcompose.experiment.report import plot_results, results_table, write_results
from mmcompose.experiment.search import search_lambdas, source_agreement, validation_accuracy
from mmcompose.experiment.tool import tool_predictor
from mmcompose.model import MultimodalLLM
from mmcompose.train.base_llm import pretrain_base
from mmcompose.train.data import load_samples
from mmcompose.train.trainer import TrainConfig, build_model, train
from mmcompose.world import MCUB3_SUBSETS, MODALITIES, build_world

RESULTS_FILE, PLOT_FILE = "results.json", "results.png"
FINAL_MODEL = "model"


@dataclass(frozen=True)
class DemoProfile:
    world: str
    base: str
    stage1_steps: int
    stage2_steps: int
    joint_steps: int
    rank: int
    batch_size: int
    search_rounds: int
    search_limit: int  # validation samples per MCUB file used by the lambda search
    agreement_prompts: int  # single-modality prompts per modality for the label-free search


PROFILES: dict[str, DemoProfile] = {
    "default": DemoProfile(world="default", base="default", stage1_steps=300, stage2_steps=400, joint_steps=800,
                           rank=16, batch_size=16, search_rounds=1, search_limit=50, agreement_prompts=48),
    "quick": DemoProfile(world="quick", base="quick", stage1_steps=40, stage2_steps=60, joint_steps=120, rank=8,
                         batch_size=8, search_rounds=1, search_limit=12, agreement_prompts=12),
}


class Demo:
    """The experiment's directory layout and steps; each step is skipped when its output exists."""

    def __init__(self, out: Path, profile: str, seed: int, console: Console) -> None:
        if profile not in PROFILES:
            raise MMComposeError(f"unknown demo profile {profile!r}; choose one of {', '.join(PROFILES)}")
        self.out, self.profile, self.settings, self.seed, self.console = out, profile, PROFILES[profile], seed, console
        self.world, self.base = out / "world", out / "base"
        self.timings: dict[str, float] = {}
        self._check_settings()

    def _check_settings(self) -> None:
        """A cached run is reused only with the same profile and seed (never mix two experiments)."""
        marker = self.out / "demo.json"
        wanted = {"profile": self.profile, "seed": self.seed, "settings": asdict(self.settings)}
        if marker.is_file():
            found = json.loads(marker.read_text())
            if found != wanted:
                raise MMComposeError(f"{self.out} holds a demo with profile {found['profile']!r}, seed "
                                     f"{found['seed']} and other settings; use another --out or delete it")
        else:
            self.out.mkdir(parents=True, exist_ok=True)
            marker.write_text(json.dumps(wanted, indent=2) + "\n")

    def step(self, name: str, output: Path, build: Callable[[], Any]) -> Path:
        if not output.exists():
            self.console.print(f"[bold]{name}[/bold] ...")
            started = time.perf_counter()
            build()
            self.timings[name] = round(time.perf_counter() - started, 1)
            self.console.print(f"  {name}: {self.timings[name]:.1f}s")
        return output

    # --- building ----------------------------------------------------------------------------------------
    def build_world(self) -> Path:
        return self.step("world", self.world, lambda: build_world(self.seed, self.world, self.settings.world))

    def build_base(self) -> Path:
        corpus = self.world / "corpus"
        return self.step("base LLM", self.base, lambda: pretrain_base(
            corpus / "train.txt", corpus / "valid.txt", self.base, profile=self.settings.base, seed=self.seed,
            text_qa=self.world / "data" / "text_qa.json", progress=False))

    def _train(self, name: str, modalities: list[str], strategy: str, data: list[str], stage: str, steps: int,
               start_from: list[Path]) -> Path:
        run = self.out / "train" / name

        def run_training() -> None:
            model = build_model(self.base, modalities, strategy=strategy, rank=self.settings.rank,
                                alpha=2.0 * self.settings.rank, start_from=start_from, seed=self.seed)
            samples = [s for file in data for s in load_samples(self.world / "data" / file)]
            config = TrainConfig(stage=stage, steps=steps, batch_size=self.settings.batch_size, seed=self.seed)
            train(model, samples, self.world, config, run, resume=True, progress=False)

        return self.step(f"train {name}", run / FINAL_MODEL, run_training)

    def single_models(self) -> dict[tuple[str, str], Path]:
        models = {}
        for modality in MODALITIES:
            stage1 = self._train(f"{modality}-stage1", [modality], "connector-only", [f"{modality}_caption.json"],
                                 "pretrain", self.settings.stage1_steps, [])
            for strategy in ("shared", "decoupled"):
                models[modality, strategy] = self._train(
                    f"{modality}-{strategy}", [modality], strategy, [f"{modality}_instruct.json"], "instruct",
                    self.settings.stage2_steps, [stage1])
        return models

    def joint_model(self) -> Path:
        stage1 = [self.out / "train" / f"{m}-stage1" / FINAL_MODEL for m in MODALITIES]
        return self._train("joint-decoupled", list(MODALITIES), "decoupled",
                           [f"{m}_instruct.json" for m in MODALITIES], "instruct", self.settings.joint_steps, stage1)

    def composition(self, name: str, config: dict[str, Any]) -> Path:
        out = self.out / "composed" / name
        return self.step(f"compose {name}", out, lambda: compose(parse_config(config), out, progress=False))

    def searched(self, name: str, config: CompositionConfig, criterion_name: str,
                 sources: dict[tuple[str, str], Path]) -> Path:
        out = self.out / "composed" / name

        def run_search() -> None:
            if criterion_name == "validation":
                validation = [s for task, samples in load_tasks(self.world, "val").items()
                              for s in samples[: self.settings.search_limit]]
                criterion = validation_accuracy(validation)
            else:
                prompts = {m: _human_only(load_benchmark(self.world / "data" / f"{m}_instruct.json", self.world))
                           [: self.settings.agreement_prompts] for m in MODALITIES}
                criterion = source_agreement(prompts, {m: load_checkpoint(sources[m, "decoupled"]).eval()
                                                       for m in MODALITIES})
            result = search_lambdas(config, criterion, self.out / "search" / f"{name}.jsonl",
                                    rounds=self.settings.search_rounds)
            compose(config.model_copy(update={"lambdas": result.lambdas}), out, progress=False)
            (self.out / "search" / f"{name}.json").write_text(json.dumps(
                {"lambdas": result.lambdas, "score": result.score, "uniform_score": result.uniform_score,
                 "trials": len(result.trials)}, indent=2) + "\n")

        return self.step(f"search {name}", out, run_search)


def _human_only(samples: list[Sample]) -> list[Sample]:
    return [s for s in samples if s.conversations[0]["value"].count("<") == 1]


MCUB_TASKS = ["MCUB-4", *[f"MCUB-3 {'-'.join(subset)}" for subset in MCUB3_SUBSETS]]


def _modalities_of(task: str) -> list[str]:
    if task == "MCUB-4":
        return list(MODALITIES)
    if task.startswith("MCUB-3 "):
        return task.removeprefix("MCUB-3 ").split("-")
    return [task]


def run_demo(out: Path, profile: str = "default", seed: int = 0, console: Console | None = None) -> dict[str, Any]:
    """Build (or reuse) everything, evaluate every method on every task, write the report; return results."""
    console = console or Console()
    demo = Demo(out, profile, seed, console)
    started = time.perf_counter()
    demo.build_world()
    demo.build_base()
    singles = demo.single_models()
    joint = demo.joint_model()

    def config(strategy: str, method: str, merge: str = "linear", **options: Any) -> dict[str, Any]:
        return {"method": method, "merge": merge, "models": [{"path": str(singles[m, strategy])} for m in MODALITIES],
                **options}

    dare = {"parameters": {"density": 0.5}, "seed": seed}
    composed = {
        "NaiveMC (linear)": demo.composition("naive-linear", config("shared", "naive")),
        "NaiveMC (TIES)": demo.composition("naive-ties", config("shared", "naive", "ties", **dare)),
        "NaiveMC (DARE)": demo.composition("naive-dare", config("shared", "naive", "dare_linear", **dare)),
        "DAMC (linear, 1/M)": demo.composition("damc-linear", config("decoupled", "damc")),
        "DAMC (TIES)": demo.composition("damc-ties", config("decoupled", "damc", "ties", **dare)),
    }
    damc = parse_config(config("decoupled", "damc"))
    composed["DAMC (searched λ, val)"] = demo.searched("damc-search-val", damc, "validation", singles)
    composed["DAMC (searched λ, label-free)"] = demo.searched("damc-search-agree", damc, "agreement", singles)

    tasks = load_tasks(demo.world)
    text_tasks = {t: load_benchmark(demo.world / "data" / f"text_{_file_tag(t)}_test.json", demo.world)
                  for t in MCUB_TASKS}
    @functools.cache
    def load(path: Path) -> MultimodalLLM:
        return load_checkpoint(path).eval()

    @functools.cache
    def text_llm() -> MultimodalLLM:
        return MultimodalLLM.from_base(demo.base, []).eval()

    def everywhere(task: str) -> bool:
        return True

    methods: dict[str, tuple[Callable[[], Predictor], Callable[[str], bool]]] = {}
    for modality in MODALITIES:
        methods[f"{modality}-LLM (own input only)"] = (
            lambda m=modality: model_predictor(load(singles[m, "decoupled"]), only=[m]),
            lambda task, m=modality: m in _modalities_of(task))
    for name, path in composed.items():
        methods[name] = (lambda p=path: model_predictor(load(p)), everywhere)
    methods["joint training (upper ref.)"] = (lambda: model_predictor(load(joint)), everywhere)
    methods["tool pipeline (captions -> LLM)"] = (
        lambda: tool_predictor({m: load(singles[m, "decoupled"]) for m in MODALITIES}, text_llm(), max_new_tokens=10),
        lambda task: task in MCUB_TASKS)

    results: dict[str, dict[str, float | None]] = {}
    columns = list(tasks)
    for method, (factory, applies) in methods.items():
        results[method] = {task: evaluate(_lazy(factory), samples, out / "eval" / _slug(method) / _slug(task), task)
                           if applies(task) else None for task, samples in tasks.items()}
    results["base LLM with entity names (text oracle)"] = {
        task: evaluate(_lazy(lambda: model_predictor(text_llm())), text_tasks[task],
                       out / "eval" / "text-oracle" / _slug(task), task) if task in text_tasks else None
        for task in columns}

    base_metrics = json.loads((demo.base / "metrics.json").read_text())
    retention = {m: {t: results[m][t] / results[f"{t}-LLM (own input only)"][t]
                     if results[f"{t}-LLM (own input only)"][t] else None for t in MODALITIES}
                 for m in composed}
    searches = {name: json.loads((out / "search" / f"{name}.json").read_text())
                for name in ("damc-search-val", "damc-search-agree")}
    extra = {"profile": profile, "seed": seed, "retention": retention, "searches": searches,
             "base_llm": {k: base_metrics.get(k) for k in ("valid_perplexity", "text_qa_accuracy", "parameters")},
             "timings": demo.timings, "seconds": round(time.perf_counter() - started, 1)}
    write_results(results, columns, out / RESULTS_FILE, extra)
    plot_results(results, {"MCUB (multi-modality)": MCUB_TASKS, "single-modality": list(MODALITIES)},
                 out / PLOT_FILE)
    table = results_table(results, columns, title=f"MCUB-world accuracy (%), profile {profile}, seed {seed}")
    Console(width=max(console.width, 120)).print(table)  # a table of 10 columns needs the width
    console.print(f"base LLM: perplexity {base_metrics.get('valid_perplexity', float('nan')):.2f}, text QA accuracy "
                  f"{100 * base_metrics.get('text_qa_accuracy', 0):.1f}%")
    for name, search in searches.items():
        console.print(f"{name}: lambdas {search['lambdas']} score {search['score']:.3f} "
                      f"(uniform {search['uniform_score']:.3f})")
    console.print(f"wrote {out / RESULTS_FILE} and {out / PLOT_FILE} in {extra['seconds']:.0f}s")
    return {"results": results, **extra}


def _lazy(factory: Callable[[], Predictor]) -> Predictor:
    """Build the predictor (and load its models) only if some sample still needs predicting: a cached
    rerun of the demo then loads no model at all."""
    built: list[Predictor] = []

    def predict(samples: Sequence[Sample]) -> Sequence[str]:
        if not built:
            built.append(factory())
        return built[0](samples)

    return predict


def _file_tag(task: str) -> str:
    return "mcub4" if task == "MCUB-4" else "mcub3_" + task.removeprefix("MCUB-3 ")


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")
