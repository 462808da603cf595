"""The plug-in registry: a modality is a processor, an encoder, a connector, a placeholder and boundary tokens.

Everything the core needs to know about a modality is looked up here by name, so user code can add one
(depth, thermal, IMU, ...) or a new part for one with `register_modality`, `register_encoder`,
`register_connector` and `register_processor` without touching any core file.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from mmcompose.errors import MMComposeError


class Processor(Protocol):
    """Turns one input (a path or an in-memory array) into the tensor its encoder takes for one sample."""

    def __call__(self, source: Any) -> torch.Tensor: ...


@dataclass(frozen=True)
class Modality:
    """Defaults for one modality; a checkpoint's manifest records the resolved types and options."""

    name: str
    placeholder: str
    processor: str
    encoder: str
    connector: str = "mlp2x_gelu"
    processor_options: dict[str, Any] = field(default_factory=dict)
    encoder_options: dict[str, Any] = field(default_factory=dict)
    connector_options: dict[str, Any] = field(default_factory=dict)
    num_prefix_tokens: int = 0
    num_suffix_tokens: int = 0


MODALITIES: dict[str, Modality] = {}
ENCODERS: dict[str, Callable[..., nn.Module]] = {}
CONNECTORS: dict[str, Callable[..., nn.Module]] = {}
PROCESSORS: dict[str, Callable[..., Processor]] = {}


def register_modality(modality: Modality, *, replace: bool = False) -> Modality:
    if modality.name in MODALITIES and not replace:
        raise MMComposeError(f"modality {modality.name!r} is already registered (pass replace=True to override)")
    if modality.name == "text":
        raise MMComposeError("'text' is the language route and cannot be a modality name")
    clash = [m.name for m in MODALITIES.values() if m.placeholder == modality.placeholder and m.name != modality.name]
    if clash:
        raise MMComposeError(f"placeholder {modality.placeholder!r} is already used by modality {clash[0]!r}")
    MODALITIES[modality.name] = modality
    return modality


def register_encoder(name: str, factory: Callable[..., nn.Module]) -> None:
    """Register an encoder type; `factory(**options)` must return a module with an `output_dim` attribute."""
    ENCODERS[name] = factory


def register_connector(name: str, factory: Callable[..., nn.Module]) -> None:
    """Register a connector type; `factory(in_dim, out_dim, **options)` maps `(n, tokens, in_dim)` encoder
    output to `(n, tokens', out_dim)` LLM embeddings."""
    CONNECTORS[name] = factory


def register_processor(name: str, factory: Callable[..., Processor]) -> None:
    PROCESSORS[name] = factory


def _lookup(table: dict[str, Any], kind: str, name: str) -> Any:
    if name not in table:
        raise MMComposeError(f"unknown {kind} {name!r}; registered: {', '.join(sorted(table)) or 'none'}")
    return table[name]


def get_modality(name: str) -> Modality:
    return _lookup(MODALITIES, "modality", name)


def build_encoder(name: str, options: dict[str, Any]) -> nn.Module:
    factory = _lookup(ENCODERS, "encoder type", name)
    try:
        return factory(**options)
    except TypeError as error:
        raise MMComposeError(f"bad options {options} for encoder {name!r}: {error}") from None


def build_connector(name: str, in_dim: int, out_dim: int, **options: Any) -> nn.Module:
    factory = _lookup(CONNECTORS, "connector type", name)
    try:
        return factory(in_dim, out_dim, **options)
    except TypeError as error:
        raise MMComposeError(f"bad options {options} for connector {name!r}: {error}") from None


def build_processor(name: str, options: dict[str, Any]) -> Processor:
    factory = _lookup(PROCESSORS, "processor type", name)
    try:
        return factory(**options)
    except TypeError as error:
        raise MMComposeError(f"bad options {options} for processor {name!r}: {error}") from None
