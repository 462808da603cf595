"""A new modality from user code alone: register a toy `depth` plug-in, train-free round trip."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from mmcompose.checkpoint import load_checkpoint, save_checkpoint
from mmcompose.modalities import Modality, register_encoder, register_modality, register_processor
from mmcompose.model import MultimodalLLM


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
