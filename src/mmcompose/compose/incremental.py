"""Add modality models to, or remove them from, a composed checkpoint without recomposing the others.

A composed checkpoint records its inputs (name, lambda, modalities, path and manifest digest). Recomposing
takes every kept model's branches and modality deltas from the composed checkpoint itself. For the
language part, a `linear` merge of LoRAs is a concatenation of per-model blocks `lambda_m * scale_m * A_m`
and `B_m`, so a kept model's block is sliced out of the composed delta and only rescaled to its new lambda:
no input checkpoint is needed. Other merges (TIES, DARE, ...) are not decomposable: their kept inputs are
read again from their recorded paths, and refused if those changed. Either way the result equals composing
the new set of models from scratch (up to float rounding of the rescale).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from mmcompose.checkpoint import MANIFEST_NAME, Manifest, checkpoint_files, read_manifest
from mmcompose.compose.config import CompositionConfig, ModelEntry, parse_config
from mmcompose.compose.engine import Source, compose_sources, manifest_digest, open_source
from mmcompose.errors import CompositionError
from mmcompose.model.spec import DeltaSpec, ModelSpec
from mmcompose.tensorfiles import TensorReader


class ViewReader:
    """A `TensorReader`-like view of part of a composed checkpoint, under an input model's tensor names."""

    def __init__(self, reader: TensorReader, views: dict[str, tuple[str, Any]]) -> None:
        self._reader, self._views = reader, views  # name -> (composed tensor name, transform or None)
        self.layout = {}
        for name, (origin, transform) in views.items():
            dtype, shape = reader.layout[origin]
            self.layout[name] = (dtype, transform.shape(shape) if transform else shape)

    def __contains__(self, name: str) -> bool:
        return name in self._views

    def names(self) -> Iterator[str]:
        return iter(self._views)

    def get(self, name: str) -> torch.Tensor:
        origin, transform = self._views[name]
        tensor = self._reader.get(origin)
        return transform(tensor) if transform else tensor

    def close(self) -> None:
        """The composed checkpoint's reader is shared by every view and closed by `recompose`."""


class Block:
    """Rows (`lora_A`, divided by the old lambda) or columns (`lora_B`) of one model's block of a concatenated LoRA."""

    def __init__(self, start: int, rank: int, factor: str, divide_by: float) -> None:
        self.start, self.rank, self.factor, self.divide_by = start, rank, factor, divide_by

    def shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return (self.rank, shape[1]) if self.factor == "lora_A" else (shape[0], self.rank)

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.factor == "lora_A":
            block = tensor[self.start:self.start + self.rank].float() / self.divide_by
            return block.to(tensor.dtype)
        return tensor[:, self.start:self.start + self.rank]


def _virtual_source(directory: Path, manifest: Manifest, reader: TensorReader, record: dict[str, Any],
                    method: str) -> Source:
    """Model `record` as it entered the composition, read back from the composed checkpoint."""
    spec = manifest.model
    mine = record["modalities"]
    merged = next((d for d in spec.deltas if "text" in d.routes), None)
    in_merge = merged is not None and record["name"] in merged.source["inputs"]
    own_name = "shared" if method == "naive" else "language"
    copied = [f"modalities.{m}." for m in mine] + ([f"deltas.{m}." for m in mine] if method == "damc" else [])
    views: dict[str, tuple[str, Any]] = {}
    deltas: list[DeltaSpec] = []
    if in_merge:
        index = merged.source["inputs"].index(record["name"])
        start, rank = sum(merged.source["ranks"][:index]), merged.source["ranks"][index]
        routes = ["text", *mine] if method == "naive" else ["text"]
        deltas.append(DeltaSpec(name=own_name, kind="lora", routes=routes, rank=rank, alpha=float(rank)))
    for name in reader.names():
        if name.startswith(tuple(copied)):
            views[name] = (name, None)
        elif in_merge and name.startswith(f"deltas.{merged.name}."):
            path, _, factor = name.removeprefix(f"deltas.{merged.name}.").rpartition(".")
            views[f"deltas.{own_name}.{path}.{factor}"] = (name, Block(start, rank, factor, record["lambda"]))
    if method == "damc":
        deltas += [d for d in spec.deltas if d.routes[0] in mine and "text" not in d.routes]
    own = ModelSpec(modalities=[m for m in spec.modalities if m.name in mine], deltas=deltas,
                    target_modules=spec.target_modules, template=spec.template,
                    chat_template=spec.chat_template, strategy="decoupled")
    view = manifest.model_copy(update={"model": own})
    return Source(directory, view, ViewReader(reader, views), record["name"], 0.0, record["density"], {},
                  {k: v for k, v in record.items() if k not in ("name", "lambda", "density", "lambda_explicit")})


def recompose(composed: str | Path, out: str | Path, *, add: Sequence[ModelEntry] = (), remove: Sequence[str] = (),
              overwrite: bool = False, progress: bool = True) -> Path:
    """A new composed checkpoint at `out`: the models of `composed`, minus `remove` (names), plus `add`."""
    composed = Path(composed)
    manifest = read_manifest(composed)
    history = manifest.provenance.get("composition")
    if history is None:
        raise CompositionError(f"{composed}: not a composed checkpoint (no composition provenance)")
    records = history["models"]
    names = [r["name"] for r in records]
    unknown = set(remove) - set(names)
    if unknown:
        raise CompositionError(f"--remove {sorted(unknown)[0]!r}: {composed} has no such model "
                               f"(it has: {', '.join(names)})")
    kept = [r for r in records if r["name"] not in remove]
    if not kept and not add:
        raise CompositionError("nothing would be left to compose")
    entries = [{"path": r["path"], "name": r["name"], "rename": r["rename"],
                **({"lambda": r["lambda"]} if r["lambda_explicit"] else {}),
                **({"density": r["density"]} if r["density"] is not None else {})} for r in kept]
    raw = {key: history[key] for key in ("method", "merge", "parameters", "seed")}
    config: CompositionConfig = parse_config({**raw, "models": entries}, str(composed))
    config = config.model_copy(update={"models": [*config.models, *add]})
    merged = next((d for d in manifest.model.deltas if "text" in d.routes), None)
    decomposable = merged is None or (history["merge"] == "linear" and merged.kind == "lora")
    reader = TensorReader(checkpoint_files(composed, manifest.files))
    sources: list[Source] = []
    try:
        for record in kept:
            in_merge = merged is not None and record["name"] in merged.source["inputs"]
            if decomposable and (not in_merge or record["lambda"] != 0):
                sources.append(_virtual_source(composed, manifest, reader, record, history["method"]))
            else:
                sources.append(_reopen(record, history["merge"]))
        for index, entry in enumerate(add, start=len(kept)):
            sources.append(open_source(entry, index))
        return compose_sources(config, sources, out, overwrite=overwrite, progress=progress)
    finally:
        reader.close()


def _reopen(record: dict[str, Any], merge: str) -> Source:
    path = Path(record["path"])
    if not (path / MANIFEST_NAME).is_file() or manifest_digest(path) != record["manifest"]:
        raise CompositionError(f"a {merge!r} merge cannot be recomputed without its input {record['name']!r}: "
                               f"{path} is missing or has changed since composition")
    entry = ModelEntry(path=path, name=record["name"], rename=record["rename"], density=record["density"])
    return open_source(entry, 0)
