"""Export an mmcompose checkpoint as a standalone directory: a stock Hugging Face LLM plus our modality files.

Layout of `out`:

    config.json, tokenizer files, ...   copied from the base LLM
    model*.safetensors (+ index)        the base weights with the text route's delta folded in: W + D_text
    mmcompose/                          an mmcompose checkpoint whose base is `..` (the exported LLM)

So `AutoModelForCausalLM.from_pretrained(out)` is the model every text token sees (what a text-only
consumer wants), and `load_checkpoint(out / "mmcompose")` is the full multimodal model with no other file.
Because the text delta now lives in `W`, every modality route must apply `D_m - D_text` (the same
correction `MultimodalLLM.fold_text_route` derives at run time): LoRA minus LoRA stays low-rank (factors
concatenated, rank `r_m + r_text`); anything else becomes dense. A modality whose tokens had no delta of
their own gets `-D_text` (delta `minus-text`) to keep seeing the original base. The exported checkpoint's
base is a different LLM from the original's, so it cannot be composed with models of the original base
(the fingerprint check refuses it); compose first, then export.

Weights are streamed file by file and tensor by tensor, keeping the base's file names and index.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from mmcompose.checkpoint import (
    TENSOR_FILE,
    BaseReference,
    Manifest,
    check_tensor_set,
    checkpoint_files,
    fingerprint_base,
    read_manifest,
    read_tensors,
    resolve_base,
    write_checkpoint,
)
from mmcompose.errors import CheckpointError
from mmcompose.files import atomic_directory
from mmcompose.importers._common import skeleton
from mmcompose.model import DeltaSpec, ModelSpec, MultimodalLLM
from mmcompose.model.routed import TEXT_ROUTE, LoRADelta, difference
from mmcompose.tensorfiles import SafetensorsStream, TensorReader, weight_files

SUBFOLDER = "mmcompose"
MINUS_TEXT = "minus-text"
# Files of the base not copied as they are: its weights (rewritten, safetensors only) and their indexes
# (the safetensors index is kept: tensor names and file names do not change).
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".index.json")
SAFETENSORS_INDEX = "model.safetensors.index.json"


def export_hf(checkpoint: Path, out: Path, overwrite: bool = False) -> Path:
    """Write `out`: the checkpoint's base LLM with its text delta folded in, plus `out/mmcompose/`."""
    checkpoint, out = Path(checkpoint), Path(out)
    manifest = read_manifest(checkpoint)
    base = resolve_base(checkpoint, manifest)
    if not base.is_dir():
        raise CheckpointError(f"{checkpoint}: base LLM not found at {base}")
    if fingerprint_base(base) != manifest.base.fingerprint:
        raise CheckpointError(f"{checkpoint}: the base LLM at {base} is not the one this checkpoint was built on")
    source = skeleton(base, manifest.model, manifest.base.fingerprint)
    source.load_checkpoint_tensors(read_tensors(checkpoint_files(checkpoint, manifest.files)))
    text = source.routing.route_to_delta.get(TEXT_ROUTE)
    spec, deltas = _corrections(source, text)
    branches = {name: value for name, value in source.checkpoint_tensors().items() if name.startswith("modalities.")}
    with atomic_directory(out, overwrite=overwrite) as temporary:
        for file in base.iterdir():
            if file.is_file() and (file.name == SAFETENSORS_INDEX or not file.name.endswith(WEIGHT_SUFFIXES)):
                shutil.copy2(file, temporary / file.name)
        for file in weight_files(base):
            _fold_file(file, temporary / file.name, source, text)
        tensors = {**branches, **deltas}
        fingerprint = fingerprint_base(temporary)
        exported = skeleton(temporary, spec, fingerprint)
        check_tensor_set(exported.checkpoint_tensors(), tensors, where=f"export of {checkpoint}")
        exported_manifest = Manifest(
            base=BaseReference(path="..", fingerprint=fingerprint), model=spec, files=[TENSOR_FILE],
            provenance={"exported_from": str(checkpoint.resolve()), "folded_delta": text,
                        "original_base": manifest.base.model_dump(), "original_provenance": manifest.provenance},
        )
        (temporary / SUBFOLDER).mkdir()
        write_checkpoint(temporary / SUBFOLDER, exported_manifest, tensors)
    return out


def _fold_file(file: Path, target: Path, model: MultimodalLLM, text: str | None) -> None:
    """Copy one safetensors file tensor by tensor, adding `D_text` (in float32) to each adapted weight."""
    folded = {f"{path}.weight": layer.deltas[text] for path, layer in model.routed.items()} if text else {}
    with TensorReader([file]) as reader, SafetensorsStream(target, reader.layout) as stream:
        for name in reader.layout:
            value = reader.get(name)
            if name in folded:
                value = (value.float() + folded[name].matrix().float()).to(value.dtype)
            stream.write(name, value)


def _corrections(model: MultimodalLLM, text: str | None) -> tuple[ModelSpec, dict[str, torch.Tensor]]:
    """The spec and delta tensors of the exported checkpoint: every modality route gets `D_m - D_text`."""
    spec = model.spec
    if text is None:
        deltas = {name: value for name, value in model.checkpoint_tensors().items() if name.startswith("deltas.")}
        return spec, deltas
    served = {route for delta in spec.deltas for route in delta.routes}
    plans = [(delta.name, delta.name, list(delta.routes)) for delta in spec.deltas if delta.name != text]
    unserved = [m.name for m in spec.modalities if m.name not in served]
    if unserved:
        plans.append((MINUS_TEXT, None, unserved))
    new_specs, tensors = [], {}
    for name, own, routes in plans:
        results = {path: difference(layer.deltas[own] if own else None, layer.deltas[text])
                   for path, layer in model.routed.items()}
        for path, result in results.items():
            tensors.update({f"deltas.{name}.{path}.{key}": value for key, value in result.state_dict().items()})
        sample, origin = next(iter(results.values())), {"exported": f"{own or 'base'} - {text}"}
        if isinstance(sample, LoRADelta):
            new_specs.append(DeltaSpec(name=name, kind="lora", routes=routes, rank=sample.rank,
                                       alpha=float(sample.alpha), source=origin))
        else:
            new_specs.append(DeltaSpec(name=name, kind="dense", routes=routes, source=origin))
    return ModelSpec(modalities=spec.modalities, deltas=new_specs, target_modules=spec.target_modules,
                     template=spec.template, chat_template=spec.chat_template,
                     strategy=spec.strategy if new_specs else "connector-only"), tensors
