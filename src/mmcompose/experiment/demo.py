"""`mmcompose demo`: the paper's experiment on the synthetic world, end to end, cached step by step.

world -> base LLM (text only) -> per modality: stage 1 (connector pretraining) and stage 2 (instruction
tuning, `shared` and `decoupled`) -> a jointly trained model (upper reference) -> compositions (NaiveMC with
linear / TIES / DARE, DAMC with uniform and searched lambda) -> evaluation on MCUB-world (4 and the four
3-modality subsets) and single-modality tests -> table, JSON, PNG.

Every step writes its output atomically and is skipped when that output exists, so an interrupted demo
resumes, and a second run only re-renders the report.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from mmcompose.checkpoint import load_checkpoint
from mmcompose.compose.config import parse_config
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
from mmcompose.world import MODALITIES, build_world

RESULTS_FILE, PLOT_FILE = "results.json", "results.png"


@dataclass(frozen=True)
class DemoProfile:
    world: str
    base: str
    stage1_steps: int
    stage2_steps: int
    joint_steps: int
    rank: int
    search_rounds: int
    search_limit: int  # validation samples per MCUB file used by the lambda search


PROFILES: dict[str, DemoProfile] = {
    "default": DemoProfile(world="default", base="default", stage1_steps=300, stage2_steps=400, joint_steps=800,
                           rank=16, search_rounds=1, search_limit=50),
    "quick": DemoProfile(world="quick", base="quick", stage1_steps=60, stage2_steps=80, joint_steps=160, rank=8,
                         search_rounds=1, search_limit=20),
}


class Demo:
    """The experiment's directory layout and steps; each `step` is skipped when its output exists."""

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
                raise MMComposeError(f"{self.out} holds a demo with {found['profile']} profile, seed {found['seed']}; "
                                     "use another --out or delete it")
        else:
            self.out.mkdir(parents=True, exist_ok=True)
            marker.write_text(json.dumps(wanted, indent=2) + "\n")

    def step(self, name: str, output: Path, build: Callable[[], Any]) -> Path:
        if output.exists():
            return output
        self.console.print(f"[bold]{name}[/bold] ...")
        started = time.perf_counter()
        build()
        self.timings[name] = round(time.perf_counter() - started, 1)
        self.console.print(f"  done in {self.timings[name]:.1f}s")
        return output

    def model_dir(self, name: str) -> Path:
        return self.out / "models" / name
