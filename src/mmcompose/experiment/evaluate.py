"""Evaluate every method of the experiment on every task, cached on disk by the resumable runner."""

from __future__ import annotations

from pathlib import Path

from mmcompose.data.names import world_task_files
from mmcompose.eval.benchmark import Sample, load_benchmark
from mmcompose.eval.runner import Predictor, run_benchmark


def evaluate(predict: Predictor, samples: list[Sample], out_dir: Path, task: str, batch_size: int = 32) -> float:
    """Accuracy of `predict` on `samples` (multiple choice); predictions and metrics are kept in `out_dir`."""
    metrics = run_benchmark(samples, predict, out_dir, task, "choice", progress=False, batch_size=batch_size)
    return metrics["accuracy"]


def load_tasks(world: Path, split: str = "test") -> dict[str, list[Sample]]:
    """Every task of a world directory (MCUB-4, the MCUB-3 subsets, the single-modality tests), loaded."""
    return {task: load_benchmark(path, world) for task, path in world_task_files(world, split).items()}

