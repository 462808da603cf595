"""The checkpoint format: `manifest.json` (format version, the base LLM by reference and fingerprint, the model
spec, the tensor files, and where the model came from) next to safetensors files.

The one manifest reader and writer; `MultimodalLLM.save_pretrained`, composition and export all write
through `write_checkpoint` / `write_manifest`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, ValidationError

from mmcompose.errors import CheckpointError
from mmcompose.files import read_json
from mmcompose.model.spec import ModelSpec, Strict
from mmcompose.tensorfiles import SafetensorsStream

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
TENSOR_FILE = "model.safetensors"


class BaseReference(Strict):
    path: str
    fingerprint: str


class Manifest(Strict):
    format: Literal["mmcompose"] = "mmcompose"
    format_version: int = FORMAT_VERSION
    base: BaseReference
    model: ModelSpec
    files: list[str]
    provenance: dict[str, Any] = Field(default_factory=dict)


def read_manifest(directory: str | Path) -> Manifest:
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        raise CheckpointError(f"{directory}: not an mmcompose checkpoint (no {MANIFEST_NAME})")
    raw = read_json(path)
    if raw.get("format") != "mmcompose":
        raise CheckpointError(f"{path}: not an mmcompose manifest (missing \"format\": \"mmcompose\")")
    if raw.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: unknown format_version {raw.get('format_version')!r}; "
                              f"this mmcompose reads version {FORMAT_VERSION}")
    try:
        return Manifest.model_validate(raw)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise CheckpointError(f"{path}: {where}: {first['msg']}") from None


def write_manifest(directory: Path, manifest: Manifest) -> None:
    """Write `directory/manifest.json` (the caller makes the directory atomic)."""
    (directory / MANIFEST_NAME).write_text(json.dumps(manifest.model_dump(mode="json"), indent=2) + "\n")


def write_checkpoint(directory: Path, manifest: Manifest, tensors: dict[str, torch.Tensor]) -> None:
    """Write `tensors` as the manifest's one tensor file, then the manifest, into `directory`."""
    layout = {name: (tensor.dtype, tuple(tensor.shape)) for name, tensor in tensors.items()}
    with SafetensorsStream(directory / TENSOR_FILE, layout) as stream:
        for name, tensor in tensors.items():  # one at a time: no second copy of a large model in memory
            stream.write(name, tensor)
    write_manifest(directory, manifest)


def base_reference(base_path: str | Path, checkpoint: Path) -> str:
    """Relative to the checkpoint when possible, so a world directory can be moved as a whole."""
    base = Path(base_path).resolve()
    try:
        return os.path.relpath(base, checkpoint.resolve().parent / checkpoint.name)
    except ValueError:
        return str(base)


def resolve_base(directory: Path, manifest: Manifest) -> Path:
    """Where the manifest's base LLM is: its path, relative to the checkpoint unless absolute."""
    base = Path(manifest.base.path)
    return base if base.is_absolute() else (directory / base).resolve()
