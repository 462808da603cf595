"""Training progress: a rich bar on a terminal, silent elsewhere (CI logs, pipes), and for jobs that run in
worker processes a small JSON file per job that the parent renders, one line per job (`ProgressBoard`).

Training code always asks `progress_bar(...)` for its bar; a process that reports to a file
(`progress_to_file`) gets a bar with the same `add_task` / `update` calls that writes the file instead.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

_report_file: Path | None = None


def _columns() -> tuple[Any, ...]:
    return (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
            TimeElapsedColumn(), TimeRemainingColumn())


class FileProgress:
    """The `Progress` calls training code makes, written to a JSON file: {description, completed, total, loss}.

    Writes are atomic (temp file, then rename), so a reader never sees half a record, and at most every
    `interval` seconds except the last one of a task, so reporting costs nothing next to a training step.
    """

    def __init__(self, path: Path, interval: float = 0.25) -> None:
        self.path, self.interval = path, interval
        self.state: dict[str, Any] = {}
        self._written = 0.0

    def __enter__(self) -> FileProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self._write(force=True)

    def add_task(self, description: str, total: float | None = None, completed: float = 0, **fields: Any) -> TaskID:
        self.state = {"description": description, "total": total, "completed": completed, **fields}
        self._write(force=True)
        return TaskID(0)

    def update(self, task: TaskID, *, completed: float | None = None, **fields: Any) -> None:
        if completed is not None:
            self.state["completed"] = completed
        self.state.update(fields)
        self._write(force=self.state.get("completed") == self.state.get("total"))

    def _write(self, force: bool) -> None:
        now = time.monotonic()
        if not self.state or (not force and now - self._written < self.interval):
            return
        self._written = now
        temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        temporary.write_text(json.dumps(self.state))
        os.replace(temporary, self.path)


@contextmanager
def progress_to_file(path: str | Path) -> Iterator[Path]:
    """Within this block, training in this process reports its progress to `path` instead of a terminal."""
    global _report_file
    previous, _report_file = _report_file, Path(path)
    _report_file.parent.mkdir(parents=True, exist_ok=True)
    try:
        yield _report_file
    finally:
        _report_file = previous


def progress_bar(enabled: bool | None) -> Progress | FileProgress:
    """A rich bar with a `{task.fields[loss]}` column; `enabled=None` means "only if stderr is a terminal".

    Inside `progress_to_file`, unless `enabled` is False, the bar is a `FileProgress` on that file."""
    if enabled is not False and _report_file is not None:
        return FileProgress(_report_file)
    if enabled is None:
        enabled = sys.stderr.isatty()
    return Progress(*_columns(), console=Console(stderr=True), disable=not enabled)


class ProgressBoard:
    """Renders the progress files in `directory` (one per job, written by `FileProgress` in any process) as
    live rich bars, one line per job, polled every `interval` seconds by a background thread.

    On a console that is not a terminal it renders nothing (a log gets the steps' own summary lines). The
    directory is emptied on entry and exit, so a board shows only its own jobs.
    """

    def __init__(self, directory: Path, console: Console, interval: float = 0.5) -> None:
        self.directory, self.console, self.interval = directory, console, interval
        self.progress = Progress(*_columns(), console=console)
        self.tasks: dict[str, TaskID] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _clear(self) -> None:
        if self.directory.is_dir():
            for file in self.directory.glob("*.json"):
                file.unlink(missing_ok=True)

    def __enter__(self) -> ProgressBoard:
        self._clear()
        self.directory.mkdir(parents=True, exist_ok=True)
        if self.console.is_terminal:
            self.progress.start()
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread.is_alive():
            self._stop.set()
            self._thread.join()
            self.poll()
            self.progress.stop()
        self._clear()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.poll()

    def poll(self) -> None:
        """Add a line for each new file (named by the file: the job) and bring every line up to date."""
        for file in sorted(self.directory.glob("*.json")):
            try:
                state = json.loads(file.read_text())
            except (OSError, ValueError):  # replaced or removed under us: read it at the next poll
                continue
            fields = {"description": file.stem, "total": state.get("total"),
                      "completed": state.get("completed", 0), "loss": state.get("loss", "-")}
            if file.stem not in self.tasks:
                self.tasks[file.stem] = self.progress.add_task(**fields)
            else:
                self.progress.update(self.tasks[file.stem], **fields)
