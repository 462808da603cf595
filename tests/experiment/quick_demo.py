"""The quick demo as a user runs it (`mmcompose demo --profile quick --jobs 2`), in a subprocess of its own.

Its stdout and stderr go to files of their own, so that a test can require an empty stderr (any library's warning
lands there, whatever its wording). It runs alone: started beside the rest of the suite, `.ci/run` on a fresh
clone took 720 s on a quiet 2-core machine against 670 s with the demo after the other tests (its two training
processes and the tests competed for the two cores, which cost more than the core its single-process base LLM
step leaves idle gave).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

TIMEOUT = 3600.0
"""Seconds from its start after which the run counts as hung."""


@dataclass
class DemoRun:
    """A started demo: its run directory, its process, and the files its stdout and stderr go to (files, not
    pipes: nobody reads a pipe while the suite runs, and a full pipe would block the demo)."""

    out: Path
    process: subprocess.Popen
    stdout: Path
    stderr: Path
    started: float

    @classmethod
    def start(cls, directory: Path) -> DemoRun:
        stdout, stderr = directory / "stdout.txt", directory / "stderr.txt"
        out = directory / "run"
        with stdout.open("w") as out_file, stderr.open("w") as err_file:
            # its own process group, so that stopping it also stops the workers it spawned
            process = subprocess.Popen([sys.executable, "-m", "mmcompose.cli", "demo", "--profile", "quick",
                                        "--out", str(out), "--jobs", "2"],
                                       stdout=out_file, stderr=err_file, start_new_session=True)
        return cls(out, process, stdout, stderr, time.monotonic())

    def wait(self) -> tuple[int, str, str]:
        """Its exit code, stdout and stderr, once it has ended."""
        code = self.process.wait(max(1.0, self.started + TIMEOUT - time.monotonic()))
        return code, self.stdout.read_text(), self.stderr.read_text()

    def stop(self) -> None:
        """End it, and its workers, if it still runs (its wait timed out or was interrupted)."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
