"""Fixtures for training tests: a quick world, tiny modality specs that read its media, and a subset of its data."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from mmcompose.model import Component, ModalitySpec
from mmcompose.train import trainer
from mmcompose.world import build_world
from tests.model.helpers import tiny_modality

TINY_PROCESSORS = {
    "image": Component(type="image", options={"size": 16}),
    "audio": Component(type="audio", options={"num_samples": 1600}),
    "video": Component(type="video", options={"num_frames": 2, "size": 16}),
    "point": Component(type="point", options={"num_points": 64}),
}


def tiny_spec(name: str, boundary: int = 1) -> ModalitySpec:
    """A modality with a one-block encoder whose processor shrinks the world's media to match it."""
    return tiny_modality(name, boundary).model_copy(update={"processor": TINY_PROCESSORS[name]})


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models gain nothing from intra-op threads, and on a busy machine spinning threads slow them 10x+."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_world(3, tmp_path_factory.mktemp("train-world") / "world", profile="small")


def samples(world: Path, name: str, count: int | None = None) -> list[dict[str, Any]]:
    data = json.loads((world / "data" / f"{name}.json").read_text())
    return data[:count]


def saved_tensors(run: Path) -> dict[str, torch.Tensor]:
    """The final model tensors of the training run in `run`."""
    return load_file(run / "model" / "model.safetensors")


def interrupt_after(monkeypatch: pytest.MonkeyPatch, step: int) -> None:
    """Simulate a kill right after the step-`step` checkpoint is complete."""
    save = trainer._save_state

    def save_then_die(directory: Path, *args: object) -> None:
        save(directory, *args)
        if directory.name == f"step-{step}":
            raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "_save_state", save_then_die)
