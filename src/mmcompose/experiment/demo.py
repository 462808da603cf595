"""`mmcompose demo`: carry out the experiment of `experiment.plan` on the synthetic world, cached step by step.

world -> base LLM (text only) -> per modality: stage 1 (LLM-free encoder pretraining, then connector
pretraining with the encoder frozen) and stage 2 (instruction tuning, `shared` and `decoupled`) -> a jointly
trained model (upper reference) -> compositions (NaiveMC with linear / TIES / DARE, DAMC with uniform and
searched lambda) -> evaluation on MCUB-world (4 and the four 3-modality subsets) and single-modality tests ->
table, claims, JSON, PNG. With several seeds, every seed's pipeline runs (or is reused) and the claims are
also checked on all seeds' items pooled.

Every step writes its output atomically and is skipped when that output exists, so an interrupted demo
resumes, and a second run only re-renders the report. After the base LLM, the steps run side by side, each as
soon as the outputs it reads exist.
"""

from __future__ import annotations

import functools
import json
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from mmcompose.checkpoint import load_checkpoint
from mmcompose.compose.config import parse_config
from mmcompose.compose.engine import compose
from mmcompose.data import names
from mmcompose.data.dataset import load_training_samples
from mmcompose.errors import MMComposeError
from mmcompose.eval.benchmark import Sample, load_benchmark
from mmcompose.eval.predict import model_predictor
from mmcompose.eval.runner import Predictor
from mmcompose.experiment.claims import MethodOutcomes, accuracy, paper_claims
from mmcompose.experiment.evaluate import evaluate, load_tasks
from mmcompose.experiment.parallel import default_jobs, run_parallel
from mmcompose.experiment.plan import (
    MCUB_TASKS,
    TASKS,
    Composition,
    DemoProfile,
    Method,
    Plan,
    Search,
    TrainingRun,
)
from mmcompose.experiment.report import environment, plot_results, print_whole, results_table, write_results
from mmcompose.experiment.search import search_lambdas, source_agreement, validation_accuracy
from mmcompose.experiment.tool import tool_predictor
from mmcompose.files import atomic_write_text
from mmcompose.model import MultimodalLLM
from mmcompose.train.base_llm import pretrain_base
from mmcompose.train.progress import ProgressBoard, progress_to_file
from mmcompose.train.trainer import TrainConfig, build_model, train
from mmcompose.world import MODALITIES, build_world

RESULTS_FILE, PLOT_FILE = "results.json", "results.png"
FINAL_MODEL = "model"
PROGRESS_DIR = "progress"


def train_run(out: Path, settings: DemoProfile, seed: int, run: TrainingRun) -> None:
    """Train `run` in `out` (resuming from its step checkpoints, if any), reporting progress to a file."""
    directory = out / "train" / run.id
    model = build_model(out / "base", run.modalities, strategy=run.strategy, rank=settings.rank,
                        alpha=2.0 * settings.rank, seed=seed, boundary_tokens=run.boundary_tokens or None,
                        start_from=[out / "train" / name / FINAL_MODEL for name in run.start_from])
    loaded = load_training_samples([out / "world" / names.DATA_DIR / file for file in run.data], out / "world", model)
    config = TrainConfig(stage=run.stage, steps=run.steps, batch_size=settings.batch_size, seed=seed,
                         train_encoder=False, lr=run.lr,
                         encoder_steps=settings.encoder_steps if run.stage == "pretrain" else 0,
                         save_every=max(1, run.steps // 4))
    with progress_to_file(out / PROGRESS_DIR / f"{run.id}.json"):
        train(model, loaded.samples, out / "world", config, directory, resume=True, skipped=loaded.skipped)


def composition_config(out: Path, composition: Composition, seed: int) -> dict[str, Any]:
    """The composition config of the demo's four single-modality models trained with its strategy."""
    options = {"parameters": {"density": 0.5}, "seed": seed} if composition.sparsified else {}
    return {"method": composition.method, "merge": composition.merge,
            "models": [{"path": str(out / "train" / f"{m}-{composition.strategy}" / FINAL_MODEL)}
                       for m in MODALITIES], **options}


def search_run(out: Path, settings: DemoProfile, seed: int, search: Search) -> None:
    """Search DAMC's lambdas by `search.criterion`; write the composed model and a summary."""
    world = out / "world"
    if search.criterion == "validation":
        validation = [s for samples in load_tasks(world, "val").values() for s in samples[: settings.search_limit]]
        criterion = validation_accuracy(validation)
    else:
        prompts = {m: _human_only(load_benchmark(world / names.DATA_DIR / names.instruct_file(m), world))
                   [: settings.agreement_prompts] for m in MODALITIES}
        sources = {m: load_checkpoint(out / "train" / f"{m}-decoupled" / FINAL_MODEL, device="auto").eval()
                   for m in MODALITIES}
        criterion = source_agreement(prompts, sources)
    log = out / "search" / f"{search.id}.jsonl"
    log.unlink(missing_ok=True)  # a search interrupted earlier starts over
    config = parse_config(composition_config(out, Composition(search.id, "decoupled", "damc"), seed))
    result = search_lambdas(config, criterion, log, rounds=settings.search_rounds)
    atomic_write_text(out / "search" / f"{search.id}.json", json.dumps(
        {"lambdas": result.lambdas, "score": result.score, "uniform_score": result.uniform_score,
         "trials": len(result.trials)}, indent=2) + "\n")
    compose(config.model_copy(update={"lambdas": result.lambdas}), out / "composed" / search.id, progress=False)


Step = TrainingRun | Composition | Search | Method
"""A step of the plan after the base LLM; `run_step` carries it out."""
STEP_KINDS = {"train": "training runs", "compose": "compositions", "search": "lambda searches",
              "evaluate": "evaluations"}


def run_step(out: Path, settings: DemoProfile, seed: int, step: Step) -> None:
    """Carry out one step (in a worker process, or in this one)."""
    if isinstance(step, TrainingRun):
        train_run(out, settings, seed, step)
    elif isinstance(step, Composition):
        compose(parse_config(composition_config(out, step, seed)), out / "composed" / step.id, progress=False)
    elif isinstance(step, Search):
        search_run(out, settings, seed, step)
    else:
        evaluate_method(out, step)


def _human_only(samples: list[Sample]) -> list[Sample]:
    return [s for s in samples if s.conversations[0]["value"].count("<") == 1]


def _predictor(out: Path, method: Method) -> Predictor:
    if method.kind == "model":
        return model_predictor(load_checkpoint(out / method.sources[0], device="auto").eval(), only=method.only)
    language_model = MultimodalLLM.from_base(out / "base", [], device="auto").eval()
    if method.kind == "text":
        return model_predictor(language_model)
    captioners = {m: load_checkpoint(out / source, device="auto").eval()
                  for m, source in zip(MODALITIES, method.sources, strict=True)}
    return tool_predictor(captioners, language_model, max_new_tokens=10)


def _eval_dir(out: Path, method: Method, task: str) -> Path:
    return out / "eval" / method.id / _slug(task)


def evaluate_method(out: Path, method: Method) -> dict[str, float]:
    """Accuracy of `method` on each of its tasks; predictions are cached under `out/eval`, and the method's
    models are loaded only if some prediction is missing."""
    world = out / "world"
    files = names.world_task_files(world)
    if method.kind == "text":
        files = {t: world / names.DATA_DIR / names.world_text_mcub_file(names.task_modalities(t)) for t in method.tasks}
    predict = _lazy(functools.partial(_predictor, out, method))
    return {task: evaluate(predict, load_benchmark(files[task], world), _eval_dir(out, method, task), task)
            for task in method.tasks}


def item_outcomes(out: Path, method: Method, task: str, seed: int) -> dict[tuple[int, str], bool]:
    """`method`'s right and wrong answers on `task`, keyed `(seed, item id)`, from its cached predictions."""
    path = _eval_dir(out, method, task) / "predictions.jsonl"
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return {(seed, record["id"]): bool(record["correct"]) for record in records}


class Demo:
    """One seed's run directory and steps; each step is skipped when its output exists."""

    def __init__(self, out: Path, plan: Plan, seed: int, console: Console, jobs: int = 1) -> None:
        self.out, self.plan, self.settings, self.seed, self.console = out, plan, plan.settings, seed, console
        self.jobs = jobs
        self.world, self.base = out / "world", out / "base"
        self.timings: dict[str, float] = {}
        self._check_settings()

    def _check_settings(self) -> None:
        """A cached run is reused only with the same plan and seed (never mix two experiments)."""
        marker = self.out / "demo.json"
        wanted = {**self.plan.identity(), "seed": self.seed}
        if marker.is_file():
            found = json.loads(marker.read_text())
            if found != wanted:
                raise MMComposeError(f"{self.out} holds a demo with profile {found.get('profile')!r}, recipe "
                                     f"{found.get('recipe', 'one-rate')!r}, seed {found.get('seed')} or other "
                                     "settings (world, base LLM, steps); use another --out or delete it")
        else:
            self.out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(marker, json.dumps(wanted, indent=2) + "\n")

    def step(self, name: str, output: Path, build: Callable[[], Any]) -> Path:
        if not output.exists():
            self.console.print(f"[bold]{name}[/bold] ...")
            started = time.perf_counter()
            build()
            self.timings[name] = round(time.perf_counter() - started, 1)
            self.console.print(f"  {name}: {self.timings[name]:.1f}s")
        return output

    def board(self) -> ProgressBoard:
        """Live progress of the training jobs of one step, one line each."""
        return ProgressBoard(self.out / PROGRESS_DIR, self.console)

    def build_world(self) -> Path:
        return self.step("world", self.world, lambda: build_world(self.seed, self.world, self.settings.world))

    def build_base(self) -> Path:
        corpus = self.world / "corpus"

        def pretrain() -> None:
            with self.board(), progress_to_file(self.out / PROGRESS_DIR / "base-llm.json"):
                pretrain_base(corpus / "train.txt", corpus / "valid.txt", self.base, profile=self.settings.base,
                              seed=self.seed, text_qa=self.world / names.DATA_DIR / names.TEXT_QA_FILE)

        return self.step("base LLM", self.base, pretrain)

    def run_path(self, run: str) -> Path:
        return self.out / "train" / run / FINAL_MODEL

    def label(self, step: Step) -> str:
        """The step's name in the log and in `timings` (`train image-stage1`, `evaluate naive-linear`)."""
        verb = {TrainingRun: "train", Composition: "compose", Search: "search", Method: "evaluate"}[type(step)]
        return f"{verb} {step.id}"

    def _finished(self, step: Step) -> bool:
        if isinstance(step, TrainingRun):
            return self.run_path(step.id).exists()
        if isinstance(step, Method):
            return all((_eval_dir(self.out, step, task) / "metrics.json").exists() for task in step.tasks)
        return (self.out / "composed" / step.id).exists()  # a search writes its composed model last

    def needs(self, step: Step) -> set[str]:
        """The labels of the steps whose outputs `step` reads."""
        searched = {search.id for search in self.plan.searches}
        if isinstance(step, TrainingRun):
            return {f"train {run}" for run in step.start_from}
        if isinstance(step, Search):
            return {f"train {m}-decoupled" for m in MODALITIES}
        if isinstance(step, Composition):
            return {f"train {m}-{step.strategy}" for m in MODALITIES}
        sources = [source.split("/")[:2] for source in step.sources]  # train/RUN/model, composed/ID
        return {f"train {name}" if kind == "train" else f"{'search' if name in searched else 'compose'} {name}"
                for kind, name in sources}

    def run_steps(self) -> None:
        """Every training run, composition, lambda search and evaluation not yet finished, `jobs` at a time, one
        process each; each starts as soon as the steps it reads have finished, in the plan's order otherwise.

        One pool of workers serves them all: a barrier after each stage left a core idle while the stage's last
        run finished, and the compositions waited for every training run."""
        plan = self.plan
        steps = [*plan.runs, *plan.compositions, *plan.searches, *plan.methods]
        pending = [step for step in steps if not self._finished(step)]
        if not pending:
            return
        labels = [self.label(step) for step in pending]
        index = {label: i for i, label in enumerate(labels)}
        after = [{index[label] for label in self.needs(step) if label in index} for step in pending]
        counts = Counter(label.split()[0] for label in labels)
        kinds = ", ".join(f"{count} {STEP_KINDS[kind]}" for kind, count in counts.items())
        self.console.print(f"[bold]run[/bold] {kinds} ({self.jobs} at a time, each once its inputs exist)")
        task = functools.partial(run_step, self.out, self.settings, self.seed)
        with self.board():
            for step, _, seconds in run_parallel(task, pending, self.jobs, after):
                label = self.label(step)
                self.timings[label] = round(seconds, 1)
                self.console.print(f"  {label}: {seconds:.1f}s")

    def scores(self) -> dict[str, dict[str, float | None]]:
        """Accuracy per method id and task (None: a task the method does not take), from the cached predictions."""
        scores = {method.id: evaluate_method(self.out, method) for method in self.plan.methods}
        return {method: {task: found.get(task) for task in TASKS} for method, found in scores.items()}

    def outcomes(self) -> MethodOutcomes:
        """Item outcomes of every method on every task it takes."""
        return {m.id: {t: item_outcomes(self.out, m, t, self.seed) for t in m.tasks} for m in self.plan.methods}


def run_demo(out: Path, plan: Plan, seed: int = 0, console: Console | None = None,
             jobs: int | None = None) -> dict[str, Any]:
    """Build (or reuse) everything `plan` needs for one seed, evaluate each of its methods on its tasks, write
    the report.

    Independent training runs and evaluations go `jobs` at a time (default: one per CPU core)."""
    console = console or Console()
    demo = Demo(out, plan, seed, console, jobs or default_jobs())
    started = time.perf_counter()
    demo.build_world()
    demo.build_base()
    demo.run_steps()
    results = demo.scores()
    outcomes = demo.outcomes()
    checks = paper_claims(outcomes)

    base_metrics = json.loads((demo.base / "metrics.json").read_text())
    searches = {s.id: json.loads((out / "search" / f"{s.id}.json").read_text()) for s in plan.searches}
    extra = {"labels": plan.labels(), "profile": plan.name, "recipe": plan.recipe, "seed": seed, "claims": checks,
             "searches": searches,
             "base_llm": {k: base_metrics.get(k) for k in ("valid_perplexity", "text_qa_accuracy", "parameters")},
             "timings": demo.timings, "seconds": round(time.perf_counter() - started, 1), "environment": environment()}
    write_results(results, list(TASKS), out / RESULTS_FILE, extra)
    labelled = {plan.labels()[method]: scores for method, scores in results.items()}
    plot_results(labelled, {"MCUB (multi-modality)": MCUB_TASKS, "single-modality": list(MODALITIES)},
                 out / PLOT_FILE)
    print_whole(console, results_table(labelled, list(TASKS), title=f"MCUB-world accuracy (%), profile {plan.name}, "
                                                                     f"recipe {plan.recipe}, seed {seed}"))
    console.print(f"base LLM: perplexity {base_metrics.get('valid_perplexity', float('nan')):.2f}, text QA accuracy "
                  f"{100 * base_metrics.get('text_qa_accuracy', 0):.1f}%")
    for name, search in searches.items():
        console.print(f"{name}: lambdas {search['lambdas']} score {search['score']:.3f} "
                      f"(uniform {search['uniform_score']:.3f})")
    print_claims(console, checks)
    console.print(f"wrote {out / RESULTS_FILE} and {out / PLOT_FILE} in {extra['seconds']:.0f}s")
    return {"results": results, **extra, "outcomes": outcomes}


VERDICT_STYLE = {"holds": "green", "does not hold": "red", "undecided": "yellow"}


def print_claims(console: Console, checks: list[dict[str, Any]], prefix: str = "claim") -> None:
    for check in checks:
        style = VERDICT_STYLE[check["verdict"]]
        console.print(f"{prefix}: {check['claim']}: {check['measured']} -> [{style}]{check['verdict']}[/{style}]")


def seed_directories(name: str, seeds: Sequence[int], out: Path | None) -> tuple[dict[int, Path], Path]:
    """Each seed's run directory and the directory of the pooled report, for the plan named `name`.

    Without `out`: `runs/demo-NAME-sSEED` per seed (the single-seed default, so those runs are reused) and
    `runs/demo-NAME-seeds-0-1-2` for the pooled report. With `out`: one seed runs in `out`; several run in
    `out/sSEED` with the pooled report in `out`."""
    if len(seeds) == 1:
        directory = out or Path("runs") / f"demo-{name}-s{seeds[0]}"
        return {seeds[0]: directory}, directory
    if out is None:
        return ({s: Path("runs") / f"demo-{name}-s{s}" for s in seeds},
                Path("runs") / f"demo-{name}-seeds-{'-'.join(map(str, seeds))}")
    return {s: out / f"s{s}" for s in seeds}, out


POOLED_FILE = "pooled.json"


def run_seeds(plan: Plan, seeds: Sequence[int], out: Path | None = None, console: Console | None = None,
              jobs: int | None = None) -> dict[str, Any]:
    """The whole demo for each seed (cached per seed), then each claim on all seeds' items pooled, with the
    per-seed table. One seed is `run_demo`."""
    if not seeds or len(set(seeds)) != len(seeds):
        raise MMComposeError(f"--seeds needs distinct seeds, got {', '.join(map(str, seeds)) or 'none'}")
    console = console or Console()
    directories, pooled_dir = seed_directories(plan.name, seeds, out)
    runs = {}
    for seed, directory in directories.items():
        if len(seeds) > 1:
            console.rule(f"seed {seed}")
        runs[seed] = run_demo(directory, plan, seed, console, jobs)
    if len(seeds) == 1:
        return runs[seeds[0]]
    pooled: dict[str, dict[str, dict]] = {}
    for run in runs.values():
        for method, tasks in run["outcomes"].items():
            for task, items in tasks.items():
                pooled.setdefault(method, {}).setdefault(task, {}).update(items)
    checks = paper_claims(pooled)
    results = {method: {task: accuracy(tasks[task]) if task in tasks else None for task in TASKS}
               for method, tasks in pooled.items()}
    labels = runs[seeds[0]]["labels"]
    report = {"profile": plan.name, "recipe": plan.recipe, "seeds": list(seeds), "labels": labels, "claims": checks,
              "per_seed": {str(seed): run["claims"] for seed, run in runs.items()},
              "directories": {str(seed): str(path) for seed, path in directories.items()}}
    write_results(results, list(TASKS), pooled_dir / POOLED_FILE, report)
    console.rule(f"pooled over seeds {', '.join(map(str, seeds))}")
    print_whole(console, results_table({labels[m]: s for m, s in results.items()}, list(TASKS),
                                       title=f"MCUB-world accuracy (%), profile {plan.name}, recipe {plan.recipe}, "
                                             "pooled"))
    print_whole(console, seed_table(runs, checks))
    print_claims(console, checks, prefix="pooled claim")
    console.print(f"wrote {pooled_dir / POOLED_FILE}")
    return {"results": results, **report}


def seed_table(runs: dict[int, dict[str, Any]], pooled: list[dict[str, Any]]) -> Table:
    """One row per seed and one for the pool: each claim's measured value and verdict."""
    table = Table(title="The paper's claims per seed and pooled (95% paired intervals)")
    table.add_column("seed", no_wrap=True)
    for check in pooled:
        table.add_column(check["claim"], overflow="fold")
    rows = [(str(seed), run["claims"]) for seed, run in runs.items()] + [("pooled", pooled)]
    for name, checks in rows:
        table.add_row(name, *(f"{c['measured']}: {c['verdict']}" for c in checks))
    return table


def _lazy(factory: Callable[[], Predictor]) -> Predictor:
    """Build the predictor (and load its models) only if some sample still needs predicting: a cached
    rerun of the demo then loads no model at all."""
    built: list[Predictor] = []

    def predict(samples: Sequence[Sample]) -> Sequence[str]:
        if not built:
            built.append(factory())
        return built[0](samples)

    return predict


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")

