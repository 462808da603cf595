"""`mmcompose demo`: the paper's experiment on the synthetic world, end to end, cached step by step.

world -> base LLM (text only) -> per modality: stage 1 (LLM-free encoder pretraining, then connector
pretraining with the encoder frozen) and stage 2 (instruction tuning, `shared` and `decoupled`) -> a jointly
trained model (upper reference) -> compositions (NaiveMC with linear / TIES / DARE, DAMC with uniform and
searched lambda) -> evaluation on MCUB-world (4 and the four 3-modality subsets) and single-modality tests ->
table, JSON, PNG.

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
from typing import Any, Literal

import numpy as np
from rich.console import Console

from mmcompose.checkpoint import load_checkpoint
from mmcompose.compose.config import parse_config
from mmcompose.compose.engine import compose
from mmcompose.data import names
from mmcompose.data.dataset import load_training_samples
from mmcompose.data.names import MCUB_TASKS
from mmcompose.errors import MMComposeError
from mmcompose.eval.benchmark import Sample, load_benchmark
from mmcompose.eval.runner import Predictor
from mmcompose.experiment.evaluate import evaluate, load_tasks
from mmcompose.experiment.parallel import default_jobs, run_parallel
from mmcompose.experiment.predict import model_predictor
from mmcompose.experiment.report import plot_results, results_table, write_results
from mmcompose.experiment.search import search_lambdas, source_agreement, validation_accuracy
from mmcompose.experiment.tool import tool_predictor
from mmcompose.files import atomic_write_text
from mmcompose.model import MultimodalLLM
from mmcompose.train.base_llm import pretrain_base
from mmcompose.train.trainer import LearningRates, TrainConfig, build_model, train
from mmcompose.world import MODALITIES, build_world

RESULTS_FILE, PLOT_FILE = "results.json", "results.png"
FINAL_MODEL = "model"


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
LEARNING_RATES = {
    "pretrain": LearningRates(encoder=1e-3, connector=3e-3, boundary=3e-3, deltas=0.0),
    "instruct": LearningRates(encoder=0.0, connector=1e-4, boundary=1e-4, deltas=3e-3),
}


@dataclass(frozen=True)
class TrainingRun:
    """One training run of the demo: its name (directory under `train/`), data files and the runs it starts from."""

    name: str
    modalities: tuple[str, ...]
    strategy: str
    data: tuple[str, ...]
    stage: str
    steps: int
    start_from: tuple[str, ...]


def train_run(out: Path, settings: DemoProfile, seed: int, run: TrainingRun) -> None:
    """Train `run` of the demo in `out` (resuming from its step checkpoints, if any)."""
    directory = out / "train" / run.name
    model = build_model(out / "base", list(run.modalities), strategy=run.strategy, rank=settings.rank,
                        alpha=2.0 * settings.rank, seed=seed,
                        start_from=[out / "train" / name / FINAL_MODEL for name in run.start_from])
    loaded = load_training_samples([out / "world" / names.DATA_DIR / file for file in run.data], out / "world", model)
    config = TrainConfig(stage=run.stage, steps=run.steps, batch_size=settings.batch_size, seed=seed,
                         train_encoder=False, lr=LEARNING_RATES[run.stage],
                         encoder_steps=settings.encoder_steps if run.stage == "pretrain" else 0,
                         save_every=max(1, run.steps // 4))
    train(model, loaded.samples, out / "world", config, directory, resume=True, progress=False)


class Demo:
    """The experiment's directory layout and steps; each step is skipped when its output exists."""

    def __init__(self, out: Path, profile: str, seed: int, console: Console, jobs: int = 1) -> None:
        if profile not in PROFILES:
            raise MMComposeError(f"unknown demo profile {profile!r}; choose one of {', '.join(PROFILES)}")
        self.out, self.profile, self.settings, self.seed, self.console = out, profile, PROFILES[profile], seed, console
        self.jobs = jobs
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
            text_qa=self.world / names.DATA_DIR / names.TEXT_QA_FILE, progress=False))

    def run_path(self, name: str) -> Path:
        return self.out / "train" / name / FINAL_MODEL

    def training_runs(self) -> list[list[TrainingRun]]:
        """Every training run, in waves: a run depends only on runs of earlier waves."""
        s = self.settings
        stage1 = [TrainingRun(f"{m}-stage1", (m,), "connector-only", (names.caption_file(m),), "pretrain",
                              s.stage1_steps, ()) for m in MODALITIES]
        stage2 = [TrainingRun(f"{m}-{strategy}", (m,), strategy, (names.instruct_file(m),), "instruct",
                              s.stage2_steps, (f"{m}-stage1",))
                  for m in MODALITIES for strategy in ("shared", "decoupled")]
        joint = TrainingRun("joint-decoupled", MODALITIES, "decoupled",
                            tuple(names.instruct_file(m) for m in MODALITIES),
                            "instruct", s.joint_steps, tuple(f"{m}-stage1" for m in MODALITIES))
        return [stage1, [joint, *stage2]]  # the longest run first, so that it does not finish last, alone

    def train_models(self) -> None:
        """Run every training run not yet finished, `jobs` at a time (one process each)."""
        for wave in self.training_runs():
            pending = [run for run in wave if not self.run_path(run.name).exists()]
            if not pending:
                continue
            self.console.print(f"[bold]train[/bold] {', '.join(run.name for run in pending)} ({self.jobs} at a time)")
            task = functools.partial(train_run, self.out, self.settings, self.seed)
            for run, _, seconds in run_parallel(task, pending, self.jobs):
                self.timings[f"train {run.name}"] = seconds
                self.console.print(f"  train {run.name}: {seconds:.1f}s")

    def single_models(self) -> dict[tuple[str, str], Path]:
        return {(m, strategy): self.run_path(f"{m}-{strategy}")
                for m in MODALITIES for strategy in ("shared", "decoupled")}

    def joint_model(self) -> Path:
        return self.run_path("joint-decoupled")

    def composition(self, name: str, config: dict[str, Any]) -> Path:
        out = self.out / "composed" / name
        return self.step(f"compose {name}", out, lambda: compose(parse_config(config), out, progress=False))

    def search_all(self) -> dict[str, Path]:
        """Both lambda searches (validation accuracy, label-free agreement), side by side."""
        outputs = {name: self.out / "composed" / name for name in SEARCHES}
        pending = [name for name, path in outputs.items() if not path.exists()]
        if pending:
            self.console.print(f"[bold]search[/bold] lambda: {', '.join(pending)} ({self.jobs} at a time)")
            task = functools.partial(search_run, self.out, self.settings, self.seed)
            for name, _, seconds in run_parallel(task, pending, self.jobs):
                self.timings[f"search {name}"] = round(seconds, 1)
                self.console.print(f"  search {name}: {seconds:.1f}s")
        return outputs


SEARCHES = {"damc-search-val": "validation", "damc-search-agree": "agreement"}
"""The lambda searches of the demo: output name -> criterion."""


def composition_config(out: Path, strategy: str, method: str, merge: str = "linear",
                       **options: Any) -> dict[str, Any]:
    """A composition of the demo's four single-modality models trained with `strategy`."""
    return {"method": method, "merge": merge,
            "models": [{"path": str(out / "train" / f"{m}-{strategy}" / FINAL_MODEL)} for m in MODALITIES], **options}


def search_run(out: Path, settings: DemoProfile, seed: int, name: str) -> None:
    """Search DAMC's lambdas with the criterion of `SEARCHES[name]`; write the composed model and a summary."""
    world = out / "world"
    if SEARCHES[name] == "validation":
        validation = [s for samples in load_tasks(world, "val").values() for s in samples[: settings.search_limit]]
        criterion = validation_accuracy(validation)
    else:
        prompts = {m: _human_only(load_benchmark(world / names.DATA_DIR / names.instruct_file(m), world))
                   [: settings.agreement_prompts] for m in MODALITIES}
        sources = {m: load_checkpoint(out / "train" / f"{m}-decoupled" / FINAL_MODEL).eval() for m in MODALITIES}
        criterion = source_agreement(prompts, sources)
    log = out / "search" / f"{name}.jsonl"
    log.unlink(missing_ok=True)  # a search interrupted earlier starts over
    config = parse_config(composition_config(out, "decoupled", "damc"))
    result = search_lambdas(config, criterion, log, rounds=settings.search_rounds)
    atomic_write_text(out / "search" / f"{name}.json", json.dumps(
        {"lambdas": result.lambdas, "score": result.score, "uniform_score": result.uniform_score,
         "trials": len(result.trials)}, indent=2) + "\n")
    compose(config.model_copy(update={"lambdas": result.lambdas}), out / "composed" / name, progress=False)


def _human_only(samples: list[Sample]) -> list[Sample]:
    return [s for s in samples if s.conversations[0]["value"].count("<") == 1]


TASKS = [*MCUB_TASKS, *MODALITIES]


@dataclass(frozen=True)
class EvalMethod:
    """A row of the results table as plain data, so that worker processes can evaluate it.

    `model`: one checkpoint answers (given only the inputs of `only`, if set); `tool`: one captioning
    checkpoint per modality (in `MODALITIES` order) and the base LLM; `text`: the base LLM on the text twins
    of the tasks (entity names in place of media)."""

    name: str
    kind: Literal["model", "tool", "text"]
    checkpoints: tuple[Path, ...] = ()
    only: tuple[str, ...] | None = None
    tasks: tuple[str, ...] = tuple(TASKS)


def _predictor(out: Path, method: EvalMethod) -> Predictor:
    if method.kind == "model":
        return model_predictor(load_checkpoint(method.checkpoints[0]).eval(), only=method.only)
    language_model = MultimodalLLM.from_base(out / "base", []).eval()
    if method.kind == "text":
        return model_predictor(language_model)
    captioners = {m: load_checkpoint(path).eval() for m, path in zip(MODALITIES, method.checkpoints, strict=True)}
    return tool_predictor(captioners, language_model, max_new_tokens=10)


def _metrics_file(out: Path, method: EvalMethod, task: str) -> Path:
    return out / "eval" / _slug(method.name) / _slug(task) / "metrics.json"


def evaluate_method(out: Path, method: EvalMethod) -> dict[str, float]:
    """Accuracy of `method` on each of its tasks; predictions are cached under `out/eval`, and the method's
    models are loaded only if some prediction is missing."""
    world = out / "world"
    files = names.world_task_files(world)
    if method.kind == "text":
        files = {t: world / names.DATA_DIR / names.world_text_mcub_file(names.task_modalities(t)) for t in method.tasks}
    predict = _lazy(functools.partial(_predictor, out, method))
    return {task: evaluate(predict, load_benchmark(files[task], world), _metrics_file(out, method, task).parent, task)
            for task in method.tasks}


def run_demo(out: Path, profile: str = "default", seed: int = 0, console: Console | None = None,
             jobs: int | None = None) -> dict[str, Any]:
    """Build (or reuse) everything, evaluate every method on every task, write the report; return results.

    Independent training runs and evaluations go `jobs` at a time (default: one per CPU core)."""
    console = console or Console()
    demo = Demo(out, profile, seed, console, jobs or default_jobs())
    started = time.perf_counter()
    demo.build_world()
    demo.build_base()
    demo.train_models()
    singles = demo.single_models()
    joint = demo.joint_model()

    config = functools.partial(composition_config, out)

    dare = {"parameters": {"density": 0.5}, "seed": seed}
    composed = {
        "NaiveMC (linear)": demo.composition("naive-linear", config("shared", "naive")),
        "NaiveMC (TIES)": demo.composition("naive-ties", config("shared", "naive", "ties", **dare)),
        "NaiveMC (DARE)": demo.composition("naive-dare", config("shared", "naive", "dare_linear", **dare)),
        "DAMC (linear, 1/M)": demo.composition("damc-linear", config("decoupled", "damc")),
        "DAMC (TIES)": demo.composition("damc-ties", config("decoupled", "damc", "ties", **dare)),
    }
    searched = demo.search_all()
    composed["DAMC (searched λ, val)"] = searched["damc-search-val"]
    composed["DAMC (searched λ, label-free)"] = searched["damc-search-agree"]

    methods = [EvalMethod(f"{m}-LLM (own input only)", "model", (singles[m, "decoupled"],), only=(m,),
                          tasks=tuple(t for t in TASKS if m in names.task_modalities(t))) for m in MODALITIES]
    methods += [EvalMethod(name, "model", (path,)) for name, path in composed.items()]
    captioners = tuple(singles[m, "decoupled"] for m in MODALITIES)
    methods += [EvalMethod("joint training (upper ref.)", "model", (joint,)),
                EvalMethod("tool pipeline (captions -> LLM)", "tool", captioners, tasks=tuple(MCUB_TASKS)),
                EvalMethod("base LLM with entity names (text oracle)", "text", tasks=tuple(MCUB_TASKS))]
    pending = [method for method in methods if not all(_metrics_file(out, method, t).exists() for t in method.tasks)]
    if pending:
        console.print(f"[bold]evaluate[/bold] {len(pending)} methods ({demo.jobs} at a time)")
        for method, _, seconds in run_parallel(functools.partial(evaluate_method, out), pending, demo.jobs):
            demo.timings[f"evaluate {method.name}"] = round(seconds, 1)
    scores = {method.name: evaluate_method(out, method) for method in methods}  # all cached by now
    results = {name: {task: found.get(task) for task in TASKS} for name, found in scores.items()}
    columns = list(TASKS)

    base_metrics = json.loads((demo.base / "metrics.json").read_text())
    retention = {m: {t: results[m][t] / results[f"{t}-LLM (own input only)"][t]
                     if results[f"{t}-LLM (own input only)"][t] else None for t in MODALITIES}
                 for m in composed}
    searches = {name: json.loads((out / "search" / f"{name}.json").read_text()) for name in SEARCHES}
    compared = [m for m in methods if m.name in {DAMC, NAIVE, SEARCHED} or m.name.endswith("(own input only)")]
    checks = paper_claims(results, retention, {m.name: mcub4_outcomes(out, m) for m in compared})
    extra = {"profile": profile, "seed": seed, "claims": checks, "retention": retention, "searches": searches,
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
    for check in checks:
        verdict = "[green]holds[/green]" if check["holds"] else "[red]does not hold[/red]"
        console.print(f"claim: {check['claim']}: {check['measured']} -> {verdict}")
    console.print(f"wrote {out / RESULTS_FILE} and {out / PLOT_FILE} in {extra['seconds']:.0f}s")
    return {"results": results, **extra}


DAMC, NAIVE, SEARCHED = "DAMC (linear, 1/M)", "NaiveMC (linear)", "DAMC (searched λ, val)"

Outcomes = dict[str, bool]
"""Per test item id, whether a method answered it right."""


def paired_interval(first: Outcomes, second: Outcomes, *, rounds: int = 4000, seed: int = 0) -> tuple[float, float]:
    """95% bootstrap interval of accuracy(first) - accuracy(second) over the items both answered.

    Items are resampled in pairs: both methods answered the same questions, and a paired interval is far tighter
    than two independent ones when the methods agree on most items.
    """
    ids = sorted(first.keys() & second.keys())
    if not ids:
        raise MMComposeError("no test item is shared by the two methods compared")
    difference = np.array([float(first[i]) - float(second[i]) for i in ids])
    draws = np.random.default_rng(seed).integers(len(ids), size=(rounds, len(ids)))
    means = difference[draws].mean(axis=1)
    return float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def paper_claims(results: dict[str, dict[str, float | None]], retention: dict[str, dict[str, float | None]],
                 outcomes: dict[str, Outcomes] | None = None) -> list[dict[str, Any]]:
    """The paper's claims, checked on this run's test results (uniform-lambda DAMC and NaiveMC, linear merge).

    A claim holds on the point estimates; with `outcomes` (per method, its MCUB-4 items) each comparison also
    gets the 95% paired interval of its difference, so that a reader can tell a lead from noise.
    """
    def score(method: str, task: str = names.MCUB4) -> float:
        return results[method][task] or 0.0

    def interval(first: str, second: str) -> dict[str, Any]:
        if outcomes is None:
            return {}
        low, high = paired_interval(outcomes[first], outcomes[second])
        return {"interval": [low, high], "note": f" (difference {100 * low:+.1f} to {100 * high:+.1f} points, 95%)"}

    singles = [f"{m}-LLM (own input only)" for m in MODALITIES]
    best = max(singles, key=score)
    lead = score(DAMC) - score(NAIVE)
    kept = min(value or 0.0 for value in retention[DAMC].values())
    checks = [
        ("DAMC beats every single-modality model on MCUB-4", score(DAMC) > score(best),
         f"{100 * score(DAMC):.1f}% vs best single {100 * score(best):.1f}%", interval(DAMC, best)),
        ("DAMC beats NaiveMC by >= 10 points on MCUB-4", lead >= 0.10, f"{100 * lead:+.1f} points",
         interval(DAMC, NAIVE)),
        ("DAMC keeps >= 95% of each source model's single-modality accuracy", kept >= 0.95,
         f"lowest retention {100 * kept:.1f}%", {}),
        ("searched lambda (validation) >= uniform lambda on MCUB-4", score(SEARCHED) >= score(DAMC),
         f"{100 * score(SEARCHED):.1f}% vs {100 * score(DAMC):.1f}%", interval(SEARCHED, DAMC)),
    ]
    return [{"claim": claim, "holds": holds, "measured": measured + extra.pop("note", ""), **extra}
            for claim, holds, measured, extra in checks]


def mcub4_outcomes(out: Path, method: EvalMethod) -> Outcomes:
    """`method`'s right and wrong answers on MCUB-4, from its cached predictions."""
    path = _metrics_file(out, method, names.MCUB4).parent / "predictions.jsonl"
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return {record["id"]: bool(record["correct"]) for record in records}


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
