"""The training progress bar: rich on a terminal, silent elsewhere (CI logs, pipes, worker processes)."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def progress_bar(enabled: bool | None) -> Progress:
    """A rich bar with a `{task.fields[loss]}` column; `enabled=None` means "only if stderr is a terminal"."""
    if enabled is None:
        enabled = sys.stderr.isatty()
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
        TimeElapsedColumn(), TimeRemainingColumn(), console=Console(stderr=True), disable=not enabled,
    )
