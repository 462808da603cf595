"""Dynamic batching: one thread owns the model and decodes every active request in one forward per step.

Requests join between steps (continuous batching): whenever a slot is free, waiting requests are
prefilled together (with their modality routes) and their rows appended to the running batch's KV cache
(`DecodeState.extend`, left padded), so a new request never waits for the current ones to finish. Rows
leave at the step they finish (EOS, a stop string, `max_tokens`) or are cancelled (client gone, timeout),
which frees their slot for the next step. A prefill runs between two steps, so it pauses the running rows
for its duration (there is no chunked prefill). Generated tokens all take the text route, which the server folds
into the base weights, so a decode step costs what the bare base LLM's does.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from mmcompose.errors import MMComposeError
from mmcompose.model.assembly import Example
from mmcompose.model.generation import DecodeState, choose, prefill, step
from mmcompose.model.mllm import MultimodalLLM


@dataclass
class Event:
    """What a request hears from the batcher: a text `delta`, the `done` finish reason, or an `error` (with the
    HTTP status it becomes: 400 for the request's own fault, 500 for the server's)."""

    kind: str
    text: str = ""
    status: int = 400
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class Job:
    """One request's generation: its inputs and sampling settings, and how it hears back (`notify`)."""

    example: Example
    max_tokens: int
    notify: Callable[[Event], None]
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    cancelled: bool = False
    tokens: list[int] = field(default_factory=list)
    shown: str = ""
    prompt_tokens: int = 0
    token_times: list[float] | None = None  # when given, `perf_counter()` at each token (benchmarks/routing.py)
    generator: torch.Generator | None = None

    def sampler(self, device: torch.device) -> torch.Generator | None:
        """The job's seeded generator (None without a seed), made at its first draw on `device`, the device of
        the logits it draws from: `torch.multinomial` wants its generator where the probabilities are, which is
        the LM head's device (a GPU's for a model on one; the last layer's under a device map), not the CPU."""
        if self.seed is not None and self.generator is None:
            self.generator = torch.Generator(device=device).manual_seed(self.seed)
        return self.generator


class Batcher:
    """Runs `Job`s on `model` in a background thread, at most `max_batch` rows per forward."""

    def __init__(self, model: MultimodalLLM, max_batch: int = 8) -> None:
        self.model, self.max_batch = model, max_batch
        self.eos = model.tokenizer.eos_token_id
        self._waiting: deque[Job] = deque()
        self._rows: list[Job] = []
        self._state: DecodeState | None = None
        self._next: torch.Tensor | None = None
        self._wake = threading.Condition()
        self._closed = False
        self.cancelled_rows = 0  # rows dropped before finishing because their request went away
        self._thread = threading.Thread(target=self._run, name="mmcompose-batcher", daemon=True)

    # --- the request side -------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join(timeout=30)

    def submit(self, job: Job) -> None:
        with self._wake:
            self._waiting.append(job)
            self._wake.notify()

    def cancel(self, job: Job) -> None:
        """Mark `job` gone; its row leaves the batch before the next step."""
        job.cancelled = True

    def load(self) -> dict[str, int]:
        return {"active": len(self._rows), "waiting": len(self._waiting), "max_batch": self.max_batch,
                "cancelled_rows": self.cancelled_rows}

    # --- the model side ---------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._closed and not self._waiting and not self._rows:
                    self._wake.wait()
                if self._closed:
                    return
                room = self.max_batch - len(self._rows)
                admitted = [self._waiting.popleft() for _ in range(min(room, len(self._waiting)))]
            admitted = [job for job in admitted if not job.cancelled]
            try:
                with torch.no_grad():
                    if admitted:
                        self._admit(admitted)
                    if self._rows:
                        self._step()
            except Exception as error:  # a failure must not kill the thread: fail the rows, keep serving
                for job in {id(job): job for job in [*self._rows, *admitted]}.values():
                    job.notify(Event("error", text=f"generation failed: {type(error).__name__}: {error}", status=500))
                self._rows, self._state, self._next = [], None, None

    def _admit(self, jobs: list[Job]) -> None:
        try:
            batch = self.model.assemble([job.example for job in jobs], padding_side="left")
        except MMComposeError as error:
            if len(jobs) > 1:  # find the one at fault; the others still run
                for job in jobs:
                    self._admit([job])
                return
            jobs[0].notify(Event("error", text=str(error)))
            return
        state, logits = prefill(self.model, batch)
        for job, length in zip(jobs, batch.attention_mask.sum(1).tolist(), strict=True):
            job.prompt_tokens = int(length)
        tokens = self._choose(jobs, logits)
        running = self._running(jobs, tokens)
        if not running:
            return
        if len(running) < len(jobs):
            index = torch.tensor(running, device=tokens.device)
            state.keep(index)
            tokens, jobs = tokens[index], [jobs[row] for row in running]
        if self._state is None:
            self._state, self._next, self._rows = state, tokens, list(jobs)
        else:
            self._state.extend(state)
            self._next = torch.cat([self._next, tokens])
            self._rows += jobs

    def _step(self) -> None:
        logits = step(self.model, self._state, self._next)
        tokens = self._choose(self._rows, logits)
        running = self._running(self._rows, tokens)
        if not running:
            self._rows, self._state, self._next = [], None, None
            return
        if len(running) < len(self._rows):
            index = torch.tensor(running, device=tokens.device)
            self._state.keep(index)
            tokens, self._rows = tokens[index], [self._rows[row] for row in running]
        self._next = tokens

    def _choose(self, jobs: list[Job], logits: torch.Tensor) -> torch.Tensor:
        tokens = logits.argmax(-1)
        for row, job in enumerate(jobs):
            if job.temperature > 0:
                tokens[row] = choose(logits[row: row + 1], job.temperature, job.top_p, job.sampler(logits.device))[0]
        return tokens

    def _running(self, jobs: list[Job], tokens: torch.Tensor) -> list[int]:
        """Record each row's new token and tell its request; the rows still running (not done, not cancelled)."""
        running = []
        for row, (job, token) in enumerate(zip(jobs, tokens.tolist(), strict=True)):
            if job.cancelled:
                self.cancelled_rows += 1
            elif not self._record(job, token):
                running.append(row)
        return running

    def _record(self, job: Job, token: int) -> bool:
        """Add `token` to `job`; stream what became final; True when the job is finished."""
        if job.token_times is not None:
            job.token_times.append(time.perf_counter())
        finished = None
        if token == self.eos:
            finished = "stop"
        else:
            job.tokens.append(token)
        text = self.model.tokenizer.decode(job.tokens, skip_special_tokens=True)
        for stop in job.stop:
            if stop in text:
                text, finished = text[: text.index(stop)], "stop"
        if finished is None and len(job.tokens) >= job.max_tokens:
            finished = "length"
        if finished is None:
            # Held back: an incomplete character, trailing spaces, and any tail that may start a stop string.
            visible = text.strip()
            if visible.endswith("\ufffd"):
                return False
            hold = max((len(s) - 1 for s in job.stop if any(visible.endswith(s[:k]) for k in range(1, len(s)))),
                       default=0)
            visible = visible[: len(visible) - hold] if hold else visible
        else:
            visible = text.strip()
        if visible.startswith(job.shown) and len(visible) > len(job.shown):
            job.notify(Event("delta", text=visible[len(job.shown):]))
            job.shown = visible
        if finished is not None:
            job.notify(Event("done", finish_reason=finished, prompt_tokens=job.prompt_tokens,
                             completion_tokens=len(job.tokens) + (token == self.eos)))
            return True
        return False


class Listener:
    """Bridges the batcher thread to one request's asyncio task: events land on an `asyncio.Queue`."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Event] = asyncio.Queue()

    def __call__(self, event: Event) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is gone: the server is shutting down
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)

    async def next(self, timeout: float) -> Any:
        return await asyncio.wait_for(self.queue.get(), timeout)
