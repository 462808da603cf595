"""Run jobs side by side, one process each, sharing the CPU's threads between them; a job may wait for others.

Small models train and evaluate faster as several single-threaded processes than as one process with many
threads (a tiny matmul gains little from a second thread), so the demo runs its steps after the base LLM this way.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from multiprocessing import get_context
from typing import TypeVar

import torch
from transformers.utils import logging as hf_logging

Job = TypeVar("Job")
Result = TypeVar("Result")


def default_jobs() -> int:
    """One job per CPU core the process may use."""
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def _start_worker(threads: int, verbosity: int, progress_bars: bool) -> None:
    """Give a worker its share of threads and the parent's transformers logging settings."""
    torch.set_num_threads(threads)
    hf_logging.set_verbosity(verbosity)
    if not progress_bars:
        hf_logging.disable_progress_bar()


def _timed(task: Callable[[Job], Result], job: Job) -> tuple[Result, float]:
    started = time.perf_counter()
    result = task(job)
    return result, time.perf_counter() - started


def run_parallel(task: Callable[[Job], Result], jobs: Sequence[Job], workers: int,
                 after: Sequence[Collection[int]] | None = None) -> Iterator[tuple[Job, Result, float]]:
    """Run `task(job)` for every job, `workers` at a time; yield `(job, result, seconds)` as each finishes.

    `after[i]` holds the indices of the jobs that job `i` waits for. A free worker takes the first job, in the
    given order, whose jobs to wait for have all finished, so the order is the priority, and a job is handed
    out only when a worker is free to start it (a ready job never queues behind one that became ready later).
    `task` and the jobs must be picklable (a module-level function, plain data): workers are spawned, not
    forked, so no thread pool or open file of the parent leaks into them. With one worker, or one job, jobs
    run in this process. The first failure (of a job, or of the caller while it consumes results) starts no
    further job and is raised once the running ones end.
    """
    waits = [set(needed) for needed in after] if after is not None else [set() for _ in jobs]
    named = ((i, j) for i, needed in enumerate(waits) for j in needed)
    if len(waits) != len(jobs) or any(j == i or not 0 <= j < len(jobs) for i, j in named):
        raise ValueError("after must name, for each job, indices of other jobs")
    unstarted, unfinished = list(range(len(jobs))), set(range(len(jobs)))

    def next_ready() -> int | None:
        for index in unstarted:
            if not waits[index] & unfinished:
                unstarted.remove(index)
                return index
        return None

    if workers <= 1 or len(jobs) <= 1:
        while (index := next_ready()) is not None:
            yield jobs[index], *_timed(task, jobs[index])
            unfinished.discard(index)
        if unstarted:
            raise ValueError("jobs wait on each other in a cycle")
        return
    workers = min(workers, len(jobs))
    threads = max(1, default_jobs() // workers)
    settings = (threads, hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled())
    pool = ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_start_worker, initargs=settings)
    try:
        running: dict[Future[tuple[Result, float]], int] = {}
        while unfinished:
            while len(running) < workers and (index := next_ready()) is not None:
                running[pool.submit(_timed, task, jobs[index])] = index
            if not running:
                raise ValueError("jobs wait on each other in a cycle")
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                index = running.pop(future)
                yield jobs[index], *future.result()
                unfinished.discard(index)
    finally:  # a failure here or in the caller: start nothing new, let the running jobs end
        pool.shutdown(wait=True, cancel_futures=True)
