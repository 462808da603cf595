"""Shared by the benchmark scripts: what they do to the random models they build locally."""

from __future__ import annotations

import torch

from mmcompose.model import MultimodalLLM


@torch.no_grad()
def randomize_deltas(model: MultimodalLLM, seed: int = 1, scale: float = 0.02) -> None:
    """Every delta factor drawn from `N(0, scale^2)` in a fixed order (routed layer, delta, parameter), so the
    variants a benchmark compares hold the same values: a LoRA's B starts at zero, which would hide its cost."""
    generator = torch.Generator().manual_seed(seed)
    for layer in model.routed.values():
        for delta in layer.deltas.values():
            for parameter in delta.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator).to(parameter.device) * scale)
