"""The paper-style results table (rich), its JSON, and a PNG bar chart."""

from __future__ import annotations

import contextlib
import json
import platform
import textwrap
from importlib.metadata import version
from pathlib import Path

import torch
from matplotlib.figure import Figure
from rich.console import Console, RenderableType
from rich.table import Table

from mmcompose.data.names import task_modalities
from mmcompose.files import atomic_file, atomic_write_text

Results = dict[str, dict[str, float | None]]  # method -> task -> accuracy (None: not applicable)


def short_task(task: str) -> str:
    """Column headers that fit a terminal: `MCUB-3-image-audio-video` -> `M3 IAV`."""
    if task.startswith("MCUB-3-"):
        return "M3 " + "".join(m[0].upper() for m in task_modalities(task))
    return task


def environment() -> dict[str, str]:
    """What numbers trained on this machine depend on besides the code and the seed: the CPU and the versions
    of the numerical libraries. A run is reproducible to the digit on the same CPU model and versions only:
    other kernels round differently, and training carries the differences into other models (the default
    demo's seed 0, same code: DAMC 43.3% on MCUB-4 on an AMD EPYC, 20.0% on an Intel Xeon)."""
    cpu = platform.processor()
    with contextlib.suppress(OSError, StopIteration):  # Linux names the model; elsewhere the platform's word
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    return {"cpu": cpu, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "python": platform.python_version(),
            **{package: version(package) for package in ("torch", "transformers", "accelerate", "numpy")}}


def results_table(results: Results, tasks: list[str], title: str) -> Table:
    table = Table(title=title, caption="M3 XYZ: MCUB-3 with (I)mage, (A)udio, (V)ideo, (P)oint; -: not applicable")
    table.add_column("method", no_wrap=True)
    for task in tasks:
        table.add_column(short_task(task), justify="right", no_wrap=True, min_width=5)
    for method, scores in results.items():
        table.add_row(method, *("-" if scores.get(t) is None else f"{100 * scores[t]:.1f}" for t in tasks))
    return table


def print_whole(console: Console, renderable: RenderableType) -> None:
    """Print a table whole: on a terminal it fits the terminal; elsewhere (a log file, CI) it is printed at its
    natural width instead of being cut at the 80 columns a console assumes when it cannot ask a terminal."""
    if console.is_terminal:
        console.print(renderable)
        return
    previous = console.width
    natural = console.measure(renderable, options=console.options.update_width(10_000)).maximum
    console.width = max(previous, natural)
    try:
        console.print(renderable)
    finally:
        console.width = previous


def write_results(results: Results, tasks: list[str], path: Path, extra: dict) -> None:
    atomic_write_text(path, json.dumps({"tasks": tasks, "results": results, **extra}, indent=2) + "\n")


def panel_means(results: Results, tasks: list[str]) -> dict[str, float | None]:
    """Each method's mean accuracy (%) over the tasks of `tasks` it takes; None if it takes none of them."""
    means: dict[str, float | None] = {}
    for method, scores in results.items():
        taken = [scores[t] for t in tasks if scores.get(t) is not None]
        means[method] = 100 * sum(taken) / len(taken) if taken else None
    return means


def plot_results(results: Results, groups: dict[str, list[str]], path: Path, chance: float = 0.25) -> None:
    """One panel per group of tasks (e.g. MCUB, single-modality), bars = mean accuracy of each method over the
    group's tasks it takes; a method that takes none of them is marked n/a rather than drawn as 0."""
    figure = Figure(figsize=(6 * len(groups), 0.45 * len(results) + 1.8))
    axes = figure.subplots(1, len(groups), squeeze=False)
    methods = list(results)
    for axis, (name, tasks) in zip(axes[0], groups.items(), strict=True):
        means = panel_means(results, tasks)
        values = [means[m] or 0.0 for m in methods]
        bars = axis.barh(methods, values, color=["#4c72b0" if "DAMC" in m else "#8c8c8c" for m in methods])
        axis.bar_label(bars, labels=["n/a" if means[m] is None else f"{means[m]:.1f}" for m in methods],
                       padding=2, fontsize=8)
        axis.axvline(100 * chance, color="#c44e52", linestyle="--", linewidth=1, label="chance")
        axis.set_xlim(0, 105)
        axis.invert_yaxis()
        axis.set_xlabel("accuracy (%)")
        taken = ", ".join(short_task(t) for t in tasks)
        axis.set_title(f"{name}\n" + textwrap.fill(f"mean of the tasks it takes: {taken}", 45),
                       fontsize=9)
        axis.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    with atomic_file(path) as temporary:
        figure.savefig(temporary, format="png", dpi=120)
