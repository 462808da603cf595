"""The batcher's seeded sampling: each job's generator is made where its logits are, once, from its seed."""

from __future__ import annotations

import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import pytest
import torch

import mmcompose.serve.batcher as batcher_module
from mmcompose.checkpoint import load_checkpoint
from mmcompose.serve.batcher import Batcher, Event, Job


def test_a_seeded_job_samples_on_the_models_device_and_repeats(checkpoint: Path) -> None:
    model = load_checkpoint(checkpoint).eval()
    example = model.conversation_example([{"from": "human", "value": "tell me about quonks"}])
    batcher = Batcher(model, max_batch=4)
    finished = threading.Event()
    events: dict[int, list[Event]] = {0: [], 1: [], 2: []}

    def listener(row: int) -> Any:
        def notify(event: Event) -> None:  # called on the batcher's thread
            events[row].append(event)
            if all(rows and rows[-1].kind != "delta" for rows in events.values()):
                finished.set()
        return notify

    jobs = [Job(example=example, max_tokens=8, notify=listener(row), temperature=1.0, seed=seed)
            for row, seed in enumerate([2**64 - 1, 2**64 - 1, 5])]
    batcher.start()
    try:
        for job in jobs:
            batcher.submit(job)
        assert finished.wait(60)
    finally:
        batcher.close()
    assert all(rows[-1].kind == "done" for rows in events.values()), events
    assert [job.generator.device for job in jobs] == [model.device] * 3
    assert [job.generator.initial_seed() for job in jobs] == [2**64 - 1, 2**64 - 1, 5]
    assert jobs[0].tokens == jobs[1].tokens  # same seed, same draws, though sampled in one batch


class _RecordingGenerator:
    """Stands for `torch.Generator` on a device this machine lacks."""

    made: ClassVar[list[torch.device]] = []

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.made.append(self.device)

    def manual_seed(self, seed: int) -> _RecordingGenerator:
        self.seed = seed
        return self


class _TorchWithRecordingGenerator:
    def __getattr__(self, name: str) -> Any:
        return _RecordingGenerator if name == "Generator" else getattr(torch, name)


def test_the_generator_is_made_on_the_logits_device_not_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Logits on `meta` stand for a GPU's (or, under a device map, the LM head's): the generator must follow
    them, since `torch.multinomial` refuses a generator on another device."""
    _RecordingGenerator.made = []
    drawn: list[tuple[torch.device, Any]] = []

    def choose(logits: torch.Tensor, temperature: float, top_p: float, generator: Any) -> torch.Tensor:
        drawn.append((logits.device, generator))
        return torch.zeros(1, dtype=torch.long, device=logits.device)

    monkeypatch.setattr(batcher_module, "torch", _TorchWithRecordingGenerator())
    monkeypatch.setattr(batcher_module, "choose", choose)
    batcher = Batcher(SimpleNamespace(tokenizer=SimpleNamespace(eos_token_id=0)))
    jobs = [Job(example=None, max_tokens=4, notify=print, temperature=1.0, seed=11),
            Job(example=None, max_tokens=4, notify=print, temperature=0.0, seed=12),  # greedy: draws nothing
            Job(example=None, max_tokens=4, notify=print, temperature=1.0)]  # unseeded: torch's default generator
    logits = torch.zeros(3, 10, device="meta")
    for _ in range(2):
        batcher._choose(jobs, logits)
    assert _RecordingGenerator.made == [torch.device("meta")]  # once, at the first draw, where the logits are
    assert [(device, None if g is None else g.seed) for device, g in drawn] == [(torch.device("meta"), 11),
                                                                               (torch.device("meta"), None)] * 2
    assert drawn[0][1] is drawn[2][1]  # the same generator continues, it is not re-seeded each step
