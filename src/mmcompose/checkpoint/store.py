"""Save and load mmcompose checkpoints: `manifest.json` plus safetensors, written atomically."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from mmcompose.checkpoint.fingerprint import fingerprint_base
from mmcompose.checkpoint.manifest import MANIFEST_NAME, BaseReference, Manifest, read_manifest
from mmcompose.errors import CheckpointError
from mmcompose.files import atomic_directory
from mmcompose.model.mllm import MultimodalLLM, load_base
from mmcompose.tensorfiles import SafetensorsStream

TENSOR_FILE = "model.safetensors"


def base_reference(base_path: str, checkpoint: Path) -> str:
    """Relative to the checkpoint when possible, so a world directory can be moved as a whole."""
    base = Path(base_path).resolve()
    try:
        return os.path.relpath(base, checkpoint.resolve().parent / checkpoint.name)
    except ValueError:
        return str(base)


def save_checkpoint(model: MultimodalLLM, out: str | Path, *, overwrite: bool = False) -> Path:
    out = Path(out)
    tensors = model.checkpoint_tensors()
    manifest = Manifest(
        base=BaseReference(path=base_reference(model.base_path, out), fingerprint=model.base_fingerprint),
        model=model.spec, files=[TENSOR_FILE], provenance=model.provenance,
    )
    with atomic_directory(out, overwrite=overwrite) as temporary:
        layout = {name: (tensor.dtype, tuple(tensor.shape)) for name, tensor in tensors.items()}
        with SafetensorsStream(temporary / TENSOR_FILE, layout) as stream:
            for name, tensor in tensors.items():  # one at a time: no second copy of a large model in memory
                stream.write(name, tensor)
        (temporary / MANIFEST_NAME).write_text(json.dumps(manifest.model_dump(mode="json"), indent=2) + "\n")
    return out


def resolve_base(directory: Path, manifest: Manifest) -> Path:
    base = Path(manifest.base.path)
    return base if base.is_absolute() else (directory / base).resolve()


def read_tensors(directory: Path, files: list[str]) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"{directory}: tensor file {name} listed in the manifest is missing")
        try:
            part = load_file(path)
        except (SafetensorError, OSError) as error:
            raise CheckpointError(f"{path}: unreadable safetensors file ({error})") from None
        duplicated = tensors.keys() & part.keys()
        if duplicated:
            raise CheckpointError(f"{path}: tensor {sorted(duplicated)[0]} also appears in another file")
        tensors.update(part)
    return tensors


def load_checkpoint(directory: str | Path, *, base: str | Path | None = None,
                    dtype: torch.dtype | None = None) -> MultimodalLLM:
    """Rebuild a model: load its base LLM (checking the fingerprint), then its own tensors, strictly."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    base_path = Path(base) if base is not None else resolve_base(directory, manifest)
    if not base_path.is_dir():
        raise CheckpointError(f"{directory}: base LLM not found at {base_path} (pass --base to point at it)")
    fingerprint = fingerprint_base(base_path)
    if fingerprint != manifest.base.fingerprint:
        raise CheckpointError(f"{directory}: the base LLM at {base_path} is not the one this checkpoint was "
                              f"built on (fingerprint {fingerprint[:19]}..., expected "
                              f"{manifest.base.fingerprint[:19]}...)")
    llm, tokenizer = load_base(base_path, dtype)
    model = MultimodalLLM(llm, tokenizer, manifest.model, base_path, fingerprint)
    model.provenance = dict(manifest.provenance)
    tensors = read_tensors(directory, manifest.files)
    if dtype is not None:
        model.branches.to(dtype)
        tensors = {name: tensor.to(dtype) if tensor.is_floating_point() else tensor for name, tensor in tensors.items()}
    model.load_checkpoint_tensors(tensors)
    return model
