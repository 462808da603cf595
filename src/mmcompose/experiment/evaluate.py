"""Evaluate every method of the experiment on every task, cached on disk by the resumable runner."""

from __future__ import annotations

from pathlib import Path

from mmcompose.eval.benchmark import Sample, load_benchmark
from mmcompose.eval.runner import Predictor, run_benchmark


def evaluate(predict: Predictor, samples: list[Sample], out_dir: Path, task: str, batch_size: int = 32) -> float:
    """Accuracy of `predict` on `samples` (multiple choice); predictions and metrics are kept in `out_dir`."""
    metrics = run_benchmark(samples, predict, out_dir, task, "choice", progress=False, batch_size=batch_size)
    return metrics["accuracy"]


def task_files(world: Path, split: str = "test") -> dict[str, Path]:
    """MCUB-4, the four MCUB-3 subsets and the single-modality tests of a world directory."""
    data = world / "data"
    files = {"MCUB-4": data / f"mcub4_{split}.json"}
    for path in sorted(data.glob(f"mcub3_*_{split}.json")):
        files["MCUB-3 " + path.name.removeprefix("mcub3_").removesuffix(f"_{split}.json")] = path
    if split == "test":
        for modality in ("image", "audio", "video", "point"):
            files[modality] = data / f"{modality}_test.json"
    return files


def load_tasks(world: Path, split: str = "test") -> dict[str, list[Sample]]:
    return {task: load_benchmark(path, world) for task, path in task_files(world, split).items()}

