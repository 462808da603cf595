"""Progress of jobs in other processes: each reports to a file, the parent renders one line per job."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

from rich.console import Console

from mmcompose.experiment.parallel import run_parallel
from mmcompose.train.progress import FileProgress, ProgressBoard, progress_bar, progress_to_file


def _job(args: tuple[Path, str, int]) -> str:
    """What training code does: ask for a bar, add a task, update it step by step."""
    directory, name, steps = args
    with progress_to_file(directory / f"{name}.json"), progress_bar(None) as bar:
        task = bar.add_task(name, total=steps, loss="-")
        for step in range(1, steps + 1):
            bar.update(task, completed=step, loss=f"{1.0 / step:.3f}")
    return name


def test_a_bar_inside_progress_to_file_writes_the_file(tmp_path: Path) -> None:
    _job((tmp_path, "run", 5))
    assert json.loads((tmp_path / "run.json").read_text()) == {"description": "run", "total": 5, "completed": 5,
                                                              "loss": "0.200"}
    with progress_to_file(tmp_path / "off.json"):
        assert not isinstance(progress_bar(False), FileProgress)  # an explicit "no progress" stays silent
    assert not isinstance(progress_bar(None), FileProgress)  # outside the block: a terminal bar (or none)


def test_the_board_renders_one_line_per_job_from_worker_processes(tmp_path: Path) -> None:
    screen = io.StringIO()
    console = Console(file=screen, force_terminal=True, width=120, color_system=None)
    jobs = [(tmp_path, "image-shared", 3), (tmp_path, "audio-decoupled", 4)]
    with ProgressBoard(tmp_path, console, interval=0.05):
        finished = sorted(name for _, name, _ in run_parallel(_job, jobs, workers=2))
    assert finished == ["audio-decoupled", "image-shared"]
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen.getvalue())  # cursor moves and line clears
    last = {line.split()[0]: line for line in text.replace("\r", "\n").splitlines() if line.strip()}
    assert "3/3" in last["image-shared"] and "loss 0.333" in last["image-shared"]
    assert "4/4" in last["audio-decoupled"] and "loss 0.250" in last["audio-decoupled"]
    assert not list(tmp_path.glob("*.json"))  # the board leaves no file behind


def test_the_board_is_silent_when_the_console_is_not_a_terminal(tmp_path: Path) -> None:
    screen = io.StringIO()
    with ProgressBoard(tmp_path, Console(file=screen, force_terminal=False)):
        _job((tmp_path, "run", 2))
    assert screen.getvalue() == ""
