"""Import LLaVA-1.5's LoRA release (`llava-v1.5-7b-lora` layout) as an image model with an exact low-rank delta.

The release is a directory with

    config.json              the LLaVA config: mm_vision_tower, mm_projector_type, mm_hidden_size,
                             mm_vision_select_layer / _feature, image_aspect_ratio, and the LLaMA fields
    adapter_config.json      a PEFT LoRA config (r 128, lora_alpha 256 over vicuna-7b-v1.5, all seven linears)
    adapter_model.bin        PEFT factors `base_model.model.model.layers.{i}.*.lora_{A,B}.weight`
      (or .safetensors)
    non_lora_trainables.bin  the projector: `base_model.model.model.mm_projector.{0,2}.{weight,bias}`

The LoRA serves every token in LLaVA (its LLM has one set of weights), so it becomes ONE `shared` LoRA delta on
text and image routes, copied factor for factor: the product is exactly the release's, no SVD. The adapter is
parsed and checked by the PEFT importer's code (`parse_lora_config`, `read_lora_factors`, `uniform_lora`), so
options a LoRA product cannot carry are refused the same way. The projector becomes the image connector; every
other entry of `non_lora_trainables.bin` (a tuned embedding table, say) would be a change this model cannot
carry and is refused. The frozen CLIP tower is not in the release: the user supplies it (`encoder`), and it is
read at the release's select layer and feature. Images are padded to a square first when the release says
`image_aspect_ratio: pad`, as LLaVA-1.5 does.

A LoRA release stores no base weights, so a different base of the SAME shape cannot be told apart here; a base
of another shape is refused (config fields, then every factor's shape).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mmcompose.checkpoint import fingerprint_base
from mmcompose.errors import CheckpointError
from mmcompose.files import read_json
from mmcompose.importers._common import (
    Filler,
    SourceKeys,
    base_config,
    check_same_llm,
    check_template,
    skeleton,
)
from mmcompose.importers.encoders import CLIP_MEAN, CLIP_STD, EncoderSource, resolve_encoder
from mmcompose.importers.modelcompose import CONNECTOR_KEYS
from mmcompose.importers.peft import parse_lora_config, read_lora_factors, uniform_lora
from mmcompose.model import Component, DeltaSpec, ModelSpec, modality_spec
from mmcompose.model.routed import DEFAULT_TARGET_MODULES
from mmcompose.tensorfiles import load_state_dict

PROJECTOR_FILE = "non_lora_trainables.bin"
# The prefixes LLaVA's loader strips from non_lora_trainables keys (PEFT's wrapper, then the causal LM's).
PROJECTOR_PREFIXES = ("base_model.model.model.mm_projector.", "model.model.mm_projector.", "model.mm_projector.")


def import_llava_lora(src: Path, out: Path, *, base: Path, encoder: EncoderSource, template: str = "vicuna_v1",
                      overwrite: bool = False) -> Path:
    """Convert the LLaVA LoRA release in `src` into an mmcompose image model in `out` on the base LLM `base`.

    `encoder` is the CLIP tower the release was trained with (`mm_vision_tower`, e.g. a local
    clip-vit-large-patch14-336). `template`: LLaVA-1.5 was trained with `llava_v1`, `vicuna_v1`'s layout whose
    system prompt says "human" where vicuna_v1 says "user"."""
    src, out, base = Path(src), Path(out), Path(base)
    template = check_template(template)
    config = read_json(src / "config.json")
    if not config.get("mm_vision_tower"):
        raise CheckpointError(f"{src / 'config.json'}: no mm_vision_tower (not a LLaVA LoRA release)")
    if not (src / PROJECTOR_FILE).is_file():
        raise CheckpointError(f"{src}: no {PROJECTOR_FILE}: the release's projector is missing, and without it the "
                              f"image model has no connector")
    width = config.get("mm_hidden_size")
    if not isinstance(width, int):
        raise CheckpointError(f"{src / 'config.json'}: no integer mm_hidden_size")
    kind = str(config.get("mm_projector_type", "linear"))
    if kind not in CONNECTOR_KEYS:
        raise CheckpointError(f"{src / 'config.json'}: mm_projector_type {kind!r} is not supported "
                              f"(importable: {', '.join(CONNECTOR_KEYS)})")
    llm_config = base_config(base)
    check_same_llm({**config, "model_type": "llama"}, llm_config, str(src))  # LlavaConfig is a LlamaConfig
    lora = parse_lora_config(src)
    rank, alpha, factors, uniform = uniform_lora(lora, read_lora_factors(src), src)
    resolved = resolve_encoder("image", encoder, clip_layer=int(config.get("mm_vision_select_layer", -2)),
                               clip_feature=str(config.get("mm_vision_select_feature", "patch")))
    if resolved.component.type != "clip-vision":
        raise CheckpointError(f"{encoder}: LLaVA's vision tower is CLIP ({config['mm_vision_tower']}), not "
                              f"{resolved.component.type}")
    names = {path.rpartition(".")[2] for path in factors}
    targets = [m for m in DEFAULT_TARGET_MODULES if m in names] + sorted(names - set(DEFAULT_TARGET_MODULES))
    spec = ModelSpec(
        modalities=[modality_spec("image", encoder=resolved.component, connector=Component(type=kind),
                                  processor=_processor(resolved.processor.options, config))],
        deltas=[DeltaSpec(name="shared", kind="lora", routes=["text", "image"], rank=rank, alpha=alpha,
                          source={"format": "llava-lora", "base_model_name_or_path": lora.base_model_name_or_path})],
        target_modules=targets, template=template, strategy="shared",
    )
    model = skeleton(base, spec, fingerprint_base(base))
    foreign = sorted(set(factors) - set(model.routed))
    if foreign:
        raise CheckpointError(f"{src}: the adapter targets {foreign[0]}, which the base LLM does not have as a "
                              f"linear layer: not the base it was tuned from")
    if model.branches["image"].encoder.output_dim != width:
        raise CheckpointError(f"{src}: the image encoder given outputs width "
                              f"{model.branches['image'].encoder.output_dim}, but the release's mm_hidden_size is "
                              f"{width}")
    filler = Filler(model, str(src))
    zero = 0
    for path in model.routed:
        pair = factors.get(path)
        for part, index in (("lora_A", 0), ("lora_B", 1)):
            key = f"deltas.shared.{path}.{part}"
            value = pair[index] if pair is not None else filler.targets[key].new_zeros(filler.targets[key].shape)
            filler.put(key, value, f"{path}.{part} of {src} (a base LLM of another shape?)")
        zero += pair is None
    projector = SourceKeys(load_state_dict(src / PROJECTOR_FILE), str(src / PROJECTOR_FILE))
    prefix = next((p for p in PROJECTOR_PREFIXES if projector.matching(p)), PROJECTOR_PREFIXES[0])
    connector = {ours: (prefix + theirs, projector.take(prefix + theirs))
                 for theirs, ours in CONNECTOR_KEYS[kind].items()}
    projector.finish()  # a missing projector tensor, or any other trained tensor, is refused here
    for ours, (theirs, value) in connector.items():
        filler.put(f"modalities.image.connector.{ours}", value, theirs)
    for name, value in resolved.tensors.items():
        filler.put(f"modalities.image.encoder.{name}", value, f"{resolved.description}: {name}")
    notes = ["the LoRA serves text and image tokens alike, as in LLaVA (an exact copy of its factors)"]
    if zero:
        notes.append(f"delta 'shared' has zero factors on {zero} linear(s) the adapter does not adapt")
    if not uniform:
        notes.append(f"per-module ranks/scalings unified: padded to rank {rank}, scaling folded into lora_B")
    if template == "vicuna_v1":
        notes.append("template vicuna_v1: LLaVA-1.5 was trained with llava_v1, the same layout whose system prompt "
                     "says 'human' where vicuna_v1 says 'user'")
    provenance: dict[str, Any] = {"imported_from": "llava-lora", "source": str(src.resolve()),
                                  "encoders": {"image": resolved.description}, "notes": notes}
    return filler.save(out, overwrite=overwrite, provenance=provenance)


def _processor(options: dict[str, Any], config: dict[str, Any]) -> Component:
    """CLIP preprocessing at the tower's crop size, after LLaVA-1.5's pad-to-square when the release asks for it."""
    size = int(options.get("size", 336))
    return Component(type="clip-image", options=dict(
        size=size, crop_size=size, image_mean=list(options.get("mean", CLIP_MEAN)),
        image_std=list(options.get("std", CLIP_STD)), pad_to_square=config.get("image_aspect_ratio") == "pad"))
