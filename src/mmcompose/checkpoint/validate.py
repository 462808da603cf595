"""Strict comparison of a tensor set against what a model expects: the one place that words the errors."""

from __future__ import annotations

import torch

from mmcompose.errors import CheckpointError


def _preview(names: set[str]) -> str:
    shown = sorted(names)[:3]
    more = f" and {len(names) - 3} more" if len(names) > 3 else ""
    return ", ".join(shown) + more


def check_tensor_set(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor],
                     where: str = "checkpoint") -> None:
    missing, unexpected = expected.keys() - found.keys(), found.keys() - expected.keys()
    if missing:
        raise CheckpointError(f"{where}: {len(missing)} missing tensor(s): {_preview(missing)}")
    if unexpected:
        raise CheckpointError(f"{where}: {len(unexpected)} unexpected tensor(s): {_preview(unexpected)}")
    for name, target in expected.items():
        value = found[name]
        if value.shape != target.shape:
            raise CheckpointError(f"{where}: tensor {name} has shape {tuple(value.shape)}, "
                                  f"expected {tuple(target.shape)}")
        if value.dtype != target.dtype:
            raise CheckpointError(f"{where}: tensor {name} has dtype {value.dtype}, expected {target.dtype}")
