"""The checkpoint manifest: format version, the base LLM by reference and fingerprint, the model spec,
the tensor files, and where the model came from (training or composition)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError

from mmcompose.errors import CheckpointError
from mmcompose.model.spec import ModelSpec, Strict

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"


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
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path}: invalid JSON ({error})") from None
    if not isinstance(raw, dict) or raw.get("format") != "mmcompose":
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
