"""Plug-ins from user code alone: a toy `depth` modality and a toy connector type, train-free round trips."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from mmcompose.checkpoint import load_checkpoint, save_checkpoint
from mmcompose.modalities import (
    Modality,
    register_connector,
    register_encoder,
    register_modality,
    register_processor,
)
from mmcompose.model import Component, Example, MultimodalLLM
from tests.model.helpers import random_input, tiny_modality


class DepthProcessor:
    """A depth map (H, W) in metres -> float32 (1, H, W) scaled to [0, 1] by `max_depth`."""

    def __init__(self, max_depth: float = 10.0) -> None:
        self.max_depth = max_depth

    def __call__(self, source: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.clip(source / self.max_depth, 0, 1).astype(np.float32))[None]


class DepthEncoder(nn.Module):
    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.output_dim = width
        self.conv = nn.Conv2d(1, width, 4, stride=4)

    def forward(self, depth: torch.Tensor) -> torch.Tensor:
        return self.conv(depth).flatten(2).transpose(1, 2)


def test_register_a_depth_modality_without_touching_core(llama_base: Path, tmp_path: Path) -> None:
    register_processor("depth-map", DepthProcessor)
    register_encoder("depth-conv", DepthEncoder)
    register_modality(Modality("depth", "<depth>", processor="depth-map", encoder="depth-conv", connector="linear",
                               processor_options={"max_depth": 5.0}, num_prefix_tokens=1), replace=True)
    model = MultimodalLLM.from_base(llama_base, ["depth"], strategy="decoupled", rank=2, alpha=2.0)
    depth = np.random.default_rng(0).uniform(0, 8, size=(8, 8))
    example = model.example("USER: <depth> how far? ASSISTANT:", {"depth": [depth]}, target=" near")
    batch = model.assemble([example])
    assert int((batch.routes == 1).sum()) == 1 + 4  # one prefix token + (8/4)^2 patches
    loss = model(batch).loss
    loss.backward()
    assert model.branches["depth"].encoder.conv.weight.grad is not None
    reloaded = load_checkpoint(save_checkpoint(model, tmp_path / "depth"))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(batch).logits, model(batch).logits)


class MeanPoolConnector(nn.Module):
    """A toy connector type: one token, the projected mean of the encoder's tokens."""

    def __init__(self, in_dim: int, out_dim: int, scale: float = 1.0) -> None:
        super().__init__()
        self.proj, self.scale = nn.Linear(in_dim, out_dim), scale

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.proj(tokens.mean(1, keepdim=True)) * self.scale


def test_register_a_connector_type_without_touching_core(llama_base: Path, tmp_path: Path) -> None:
    register_connector("mean-pool", MeanPoolConnector)
    spec = tiny_modality("image").model_copy(update={"connector": Component(type="mean-pool",
                                                                            options={"scale": 0.5})})
    model = MultimodalLLM.from_base(llama_base, [spec], strategy="connector-only")
    connector = model.branches["image"].connector
    assert isinstance(connector, MeanPoolConnector) and connector.scale == 0.5
    batch = model.assemble([Example(prompt="USER: <image> what? ASSISTANT:",
                                    inputs={"image": [random_input("image", torch.Generator())]})])
    assert int((batch.routes == 1).sum()) == 1  # one token, whatever the encoder's length
    reloaded = MultimodalLLM.from_pretrained(model.save_pretrained(tmp_path / "pooled"))
    assert reloaded.spec.modalities[0].connector == Component(type="mean-pool", options={"scale": 0.5})
    with torch.no_grad():
        torch.testing.assert_close(reloaded(batch).logits, model(batch).logits)
