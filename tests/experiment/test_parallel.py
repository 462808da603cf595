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


def _stamped(seconds: float) -> tuple[float, float]:
    started = time.monotonic()  # one clock for every process of the machine
    time.sleep(seconds)
    return started, time.monotonic()


@pytest.mark.parametrize("workers", [1, 2])
def test_a_job_starts_after_the_jobs_it_waits_for(workers: int) -> None:
    jobs = [0.3, 0.05, 0.051, 0.052, 0.0]
    after = [set(), set(), {1}, set(), {0, 2}]
    stamps = {job: times for job, times, _ in run_parallel(_stamped, jobs, workers, after)}
    (_, end0), (_, end1), (start2, end2), _, (start4, _) = (stamps[job] for job in jobs)
    assert start2 >= end1 and start4 >= max(end0, end2)


def test_the_first_ready_job_in_the_order_goes_first() -> None:
    # 2 becomes ready when 1 ends, after 3 was ready, and still goes before it: the order is the priority
    jobs = [0.0, 0.01, 0.02, 0.03]
    finished = [job for job, _, _ in run_parallel(_stamped, jobs, 1, after=[set(), {0}, {1}, set()])]
    assert finished == jobs
    finished = [job for job, _, _ in run_parallel(_stamped, jobs, 1, after=[{3}, set(), set(), set()])]
    assert finished == [0.01, 0.02, 0.03, 0.0]


@pytest.mark.parametrize("workers", [1, 2])
def test_jobs_that_wait_on_each_other_are_refused(workers: int) -> None:
    with pytest.raises(ValueError, match="cycle"):
        list(run_parallel(math.sqrt, [1.0, 4.0, 9.0], workers, after=[set(), {2}, {1}]))
    with pytest.raises(ValueError, match="indices of other jobs"):
        list(run_parallel(math.sqrt, [1.0, 4.0], workers, after=[{0}, set()]))


def test_default_jobs_counts_the_cores_this_process_may_use(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 3, 5}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert default_jobs() == 3  # the affinity mask, not the machine's core count
    monkeypatch.delattr(os, "sched_getaffinity")
    assert default_jobs() == 64
    monkeypatch.setattr(os, "cpu_count", lambda: None)  # unknown: one job
    assert default_jobs() == 1
