"""The quick demo as a user runs it (`mmcompose demo --profile quick --jobs 2`), in a subprocess of its own.

The test session starts it with its first test (`tests/conftest.py`) whenever a collected test needs it, and the
tests that read it wait for it; the rest of the suite runs beside it. Its stdout and stderr go to files of their
own, so that a test can require an empty stderr (any library's warning lands there, whatever its wording).

Beside the suite it used to make `.ci/run` slower, not faster (720 s against 670 s alone): OpenMP's threads spun
at every barrier, and a spinning thread whose partner's core another process holds waits a whole time slice.
The session makes them sleep (OMP_WAIT_POLICY=PASSIVE, set in `tests/conftest.py` and inherited by the demo):
`.ci/run` on a fresh clone then took 557-601 s beside against 700 s alone, on the same quiet 2-core machine.
The setting is the session's, not the package's: alone, the demo's base LLM step (2 threads) took 161 s with
sleeping threads against 118 s with spinning ones on that machine.
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
        """End it, and its workers, if it still runs (the session ended first: a failure, `-x`, Ctrl-C)."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
