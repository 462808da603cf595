"""Side-by-side jobs: every job runs once with its own result, in this process or in spawned workers."""

from __future__ import annotations

import math
import os
import time

import pytest

from mmcompose.experiment.parallel import default_jobs, run_parallel


def _root_and_process(x: float) -> tuple[float, int]:
    time.sleep(x / 100)  # job x takes at least x/100 s, so its reported time has a known lower bound
    return math.sqrt(x), os.getpid()


@pytest.mark.parametrize("workers", [1, 2])
def test_every_job_runs_once_and_yields_its_result(workers: int) -> None:
    finished = list(run_parallel(_root_and_process, [0.0, 1.0, 4.0, 9.0], workers))
    assert sorted((job, root) for job, (root, _), _ in finished) == [(0.0, 0.0), (1.0, 1.0), (4.0, 2.0), (9.0, 3.0)]
    assert all(seconds >= job / 100 for job, _, seconds in finished)  # each job's own time, not another's
    processes = {process for _, (_, process), _ in finished}
    assert (processes == {os.getpid()}) == (workers == 1)  # more workers: spawned processes, not this one


@pytest.mark.parametrize("workers", [1, 2])
def test_a_failing_job_raises_its_error(workers: int) -> None:
    with pytest.raises(ValueError, match="math domain error"):
        list(run_parallel(math.sqrt, [1.0, -1.0, 4.0], workers))


def test_default_jobs_counts_the_cores_this_process_may_use(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 3, 5}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert default_jobs() == 3  # the affinity mask, not the machine's core count
    monkeypatch.delattr(os, "sched_getaffinity")
    assert default_jobs() == 64
    monkeypatch.setattr(os, "cpu_count", lambda: None)  # unknown: one job
    assert default_jobs() == 1
