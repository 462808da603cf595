"""What the pretrained encoder families (`clip`, `whisper`, `clap`, `point_bert`) share: loading local
transformers checkpoints strictly.

Every pretrained encoder builds from a config (random weights, what the tests use) and keeps in `options`
only what rebuilds its architecture, never a path: a checkpoint stores the encoder's tensors, so rebuilding
must not depend on the original files. Pretrained weights come from LOCAL files only; nothing is ever
downloaded. Missing weights are an error, never a silent random initialisation.

Pretrained encoders contain BatchNorm (CLAP, Point-BERT) and dropout (CLAP): run them in `eval()` mode, as
the original models do, or their outputs (and running statistics) change.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, PreTrainedModel

from mmcompose.errors import CheckpointError


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def load_local_part(model_class: type[PreTrainedModel], path: str | Path, part: str, what: str) -> PreTrainedModel:
    """`model_class.from_pretrained(path)` from local files, refusing the result if any weight of the sub-module
    `part` (a key prefix, "" for all) was missing: transformers would otherwise initialise it randomly."""
    try:
        model, info = model_class.from_pretrained(path, local_files_only=True, output_loading_info=True)
    except (OSError, ValueError, KeyError) as error:
        raise CheckpointError(f"{path}: cannot load a local {what} checkpoint ({first_line(error)})") from None
    missing = sorted(key for key in info["missing_keys"] if key.startswith(part))
    if missing:
        raise CheckpointError(f"{path}: not a {what} checkpoint, {len(missing)} weights missing "
                              f"(first: {missing[0]})")
    return model


def local_model_type(path: str | Path, what: str, allowed: tuple[str, ...]) -> str:
    """The `model_type` of a local checkpoint, checked before loading: transformers would try any config."""
    try:
        model_type = AutoConfig.from_pretrained(path, local_files_only=True).model_type
    except (OSError, ValueError, KeyError) as error:
        raise CheckpointError(f"{path}: cannot read a local {what} config ({first_line(error)})") from None
    if model_type not in allowed:
        raise CheckpointError(f"{path}: not a {what} checkpoint (model_type {model_type!r})")
    return model_type


def load_strict(module: nn.Module, weights: dict[str, torch.Tensor], where: str, family: str,
                optional: tuple[str, ...] = ("num_batches_tracked",)) -> None:
    """Load foreign pretrained `weights` into `module`, refusing any mismatch in one line that names `where`: a
    missing key, an unexpected key, or a shape the module's config does not imply (the first of each, with the
    counts). Keys ending in `optional` may be absent (old BatchNorm checkpoints lack the batch counter)."""
    expected = module.state_dict()
    missing = [key for key in expected if key not in weights and not key.endswith(optional)]
    unexpected = [key for key in weights if key not in expected]
    if missing or unexpected:
        first = f"missing key {missing[0]}" if missing else f"unexpected key {unexpected[0]}"
        raise CheckpointError(f"{where}: weights do not match the {family} config ({first}; {len(missing)} missing, "
                              f"{len(unexpected)} unexpected)")
    for key, value in expected.items():
        if key in weights and weights[key].shape != value.shape:
            raise CheckpointError(f"{where}: key {key} has shape {tuple(weights[key].shape)}, the config implies "
                                  f"{tuple(value.shape)}")
    module.load_state_dict(weights, strict=False)


def device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device
