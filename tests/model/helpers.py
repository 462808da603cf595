"""Tiny modality configurations and random inputs shared by the model tests."""

from __future__ import annotations

import torch

from mmcompose.model import Component, ModalitySpec, modality_spec

TINY_ENCODERS = {
    "image": Component(type="image-patch", options=dict(image_size=16, patch_size=8, width=16, depth=1, heads=2)),
    "audio": Component(type="audio-frame", options=dict(num_samples=1600, n_fft=64, hop=400, width=16, depth=1,
                                                        heads=2)),
    "video": Component(type="video-frame", options=dict(num_frames=2, patch_size=8, tokens_per_frame=1, width=16,
                                                        depth=1, heads=2)),
    "point": Component(type="point-group", options=dict(num_groups=4, group_size=8, width=16, depth=1, heads=2)),
}
INPUT_SHAPES = {"image": (3, 16, 16), "audio": (1600,), "video": (2, 3, 16, 16), "point": (64, 3)}


def tiny_modality(name: str, boundary: int = 0) -> ModalitySpec:
    return modality_spec(name, encoder=TINY_ENCODERS[name], num_prefix_tokens=boundary, num_suffix_tokens=boundary)


def random_input(name: str, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(INPUT_SHAPES[name], generator=generator)


def randomize_deltas(model: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> None:
    """Give every delta (and boundary token) non-zero random values, so tests see their effect."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.named_parameters():
            if ".deltas." in name or name.endswith(("prefix", "suffix")):
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * scale)
