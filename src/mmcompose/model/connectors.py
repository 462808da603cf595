"""Connectors (the survey's "multimodal perceivers"): map encoder tokens of width `in_dim` to LLM width.

Keys follow the official checkpoints so imports stay a rename-free copy: `mlp2x_gelu` keeps its two
linears at indices 0 and 2, as LLaVA and ModelCompose store them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from mmcompose.errors import MMComposeError
from mmcompose.model.qformer import QFormerConnector


class LinearConnector(nn.Module):
    """One linear projection per token (LLaVA-1)."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(in_dim, out_dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.proj(tokens)


class MLPConnector(nn.Sequential):
    """Two linears with a GELU between (LLaVA-1.5 `mlp2x_gelu`); a Sequential so keys are `0.*` and `2.*`."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))


class ResamplerConnector(nn.Module):
    """A fixed number of learned queries cross-attend to the encoder tokens (Q-Former / Perceiver style).

    The output length is `num_queries` whatever the input length, which bounds the LLM sequence for long
    inputs (audio, video).
    """

    def __init__(self, in_dim: int, out_dim: int, num_queries: int = 32, width: int = 256,
                 num_heads: int = 4, num_layers: int = 1) -> None:
        super().__init__()
        self.queries = nn.Parameter(torch.randn(num_queries, width) * 0.02)
        self.input_proj = nn.Linear(in_dim, width)
        self.layers = nn.ModuleList(
            nn.TransformerDecoderLayer(width, num_heads, dim_feedforward=4 * width, batch_first=True,
                                       norm_first=True, dropout=0.0)
            for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(width)
        self.output_proj = nn.Linear(width, out_dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        memory = self.input_proj(tokens)
        queries = self.queries.unsqueeze(0).expand(tokens.shape[0], -1, -1)
        for layer in self.layers:
            queries = layer(queries, memory)
        return self.output_proj(self.norm(queries))


CONNECTORS: dict[str, Callable[..., nn.Module]] = {
    "linear": LinearConnector,
    "mlp2x_gelu": MLPConnector,
    "resampler": ResamplerConnector,
    "qformer": QFormerConnector,
}


def build_connector(kind: str, in_dim: int, out_dim: int, **options: Any) -> nn.Module:
    """Build a registered connector; unknown kinds and options are one-line errors."""
    if kind not in CONNECTORS:
        raise MMComposeError(f"unknown connector type {kind!r}; known: {', '.join(sorted(CONNECTORS))}")
    try:
        return CONNECTORS[kind](in_dim, out_dim, **options)
    except TypeError as error:
        raise MMComposeError(f"bad options {options} for connector {kind!r}: {error}") from None
