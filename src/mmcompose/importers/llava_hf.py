"""Import a transformers LLaVA checkpoint (`LlavaForConditionalGeneration.save_pretrained`) as an image model.

A LLaVA fine-tunes the whole LLM, so its language part is stored here as what it changed (`LLMChange`):
`W_llava - W_base` on every target linear, as a dense `full` delta serving text and image tokens alike (LLaVA
has one set of weights for all tokens), or compressed to a LoRA of `svd_rank` by truncated SVD with its exact
relative Frobenius error recorded in the provenance. Everything else in the LLM must be the base's; the rows
llava-hf appends to the vocabulary (`<image>`, padding) are dropped and recorded. Buffers that older
checkpoints saved but models recompute (`position_ids`, `rotary_emb.inv_freq`) are skipped.

The vision tower becomes a `clip-vision` encoder (hidden state `vision_feature_layer`, CLS dropped for the
`default` select strategy) and the projector `linear_1`/`linear_2` a `mlp2x_gelu` connector (`0.*`/`2.*`).
Weights are read tensor by tensor, in both the hub layout (`language_model.model.*`) and
the newer one (`model.language_model.*`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from mmcompose.checkpoint import fingerprint_base
from mmcompose.errors import CheckpointError
from mmcompose.files import read_json
from mmcompose.importers._common import (
    DERIVED_BUFFERS,
    Filler,
    LLMChange,
    base_config,
    check_same_llm,
    check_template,
    hf_config,
    llm_delta_specs,
    skeleton,
    source_tensors,
)
from mmcompose.importers.encoders import CLIP_MEAN, CLIP_STD
from mmcompose.model import Component, ModelSpec, modality_spec
from mmcompose.model.routed import DEFAULT_TARGET_MODULES
from mmcompose.tensorfiles import TensorReader, weight_files

logger = logging.getLogger(__name__)

# (prefix in the LLaVA file, prefix in a stock causal LM), longest first.
LLM_PREFIXES = (("language_model.model.", "model."), ("model.language_model.", "model."),
                ("language_model.lm_head.", "lm_head."), ("lm_head.", "lm_head."))
VISION_PREFIXES = ("model.vision_tower.", "vision_tower.")
PROJECTOR_PREFIXES = ("model.multi_modal_projector.", "multi_modal_projector.")
PROJECTOR_NAMES = {"linear_1.weight": "0.weight", "linear_1.bias": "0.bias",
                   "linear_2.weight": "2.weight", "linear_2.bias": "2.bias"}


def import_llava_hf(src: Path, out: Path, *, base: Path, svd_rank: int | None = None, template: str = "tagged",
                    overwrite: bool = False) -> Path:
    """Convert the LLaVA in `src` into an mmcompose image model in `out`, as a delta on the base LLM `base`.

    `template` is the conversation layout recorded: `tagged` is llava-hf's own chat template (`USER: ...
    ASSISTANT:`, no system prompt); composing with ModelCompose releases needs theirs, `vicuna_v1`."""
    src, out, base = Path(src), Path(out), Path(base)
    config = read_json(src / "config.json")
    if config.get("mm_video_tower") or config.get("model_type") == "video_llava":
        raise CheckpointError(f"{src}: a Video-LLaVA checkpoint; import it with `mmcompose import video-llava`")
    if config.get("model_type") != "llava" or "mm_vision_tower" in config:
        layout = ", original LLaVA layout with mm_vision_tower" if "mm_vision_tower" in config else ""
        raise CheckpointError(f"{src}: not a LLaVA checkpoint in the llava-hf layout (model_type "
                              f"{config.get('model_type')!r}{layout})")
    deltas = llm_delta_specs(svd_rank, ["text", "image"], {"format": "llava-hf"})
    config = hf_config(src).to_dict()  # with what the file left at defaults
    text, vision = config["text_config"], config["vision_config"]
    llm_config = base_config(base)
    check_same_llm(text, llm_config, str(src))
    spec = ModelSpec(
        modalities=[modality_spec("image", encoder=_encoder(src, config, vision), connector=_connector(src, config),
                                  processor=_processor(src, vision))],
        deltas=deltas, target_modules=list(DEFAULT_TARGET_MODULES), template=check_template(template),
        strategy="full" if svd_rank is None else "shared",
    )
    model = skeleton(base, spec, fingerprint_base(base))
    filler = Filler(model, str(src))
    encoder_names = {vision_key(name): name for name in model.branches["image"].encoder.state_dict()}
    with TensorReader(weight_files(base)) as original, \
            LLMChange(filler, original, llm_config, text["vocab_size"], deltas[0], str(src)) as change:
        for name, value in source_tensors(src):
            if name.endswith(DERIVED_BUFFERS):
                continue
            llm_name = llm_name_of(name)
            if llm_name is not None:
                change.add(llm_name, value, name)
            elif name.startswith(VISION_PREFIXES):
                key = vision_key(strip_prefix(name, VISION_PREFIXES))
                if key not in encoder_names:
                    raise CheckpointError(f"{src}: vision tower tensor {name} has no place in a CLIP vision model")
                filler.put(f"modalities.image.encoder.{encoder_names[key]}", value, name)
            elif name.startswith(PROJECTOR_PREFIXES) and strip_prefix(name, PROJECTOR_PREFIXES) in PROJECTOR_NAMES:
                filler.put(f"modalities.image.connector.{PROJECTOR_NAMES[strip_prefix(name, PROJECTOR_PREFIXES)]}",
                           value, name)
            else:
                raise CheckpointError(f"{src}: unknown tensor {name}")
        changed = change.finish()
    if config.get("multimodal_projector_bias") is False:  # no biases stored: zero biases are the same map
        for name in ("modalities.image.connector.0.bias", "modalities.image.connector.2.bias"):
            filler.put(name, torch.zeros_like(filler.targets[name]))
    provenance: dict[str, Any] = {"imported_from": "llava-hf", "source": str(src.resolve()), **changed}
    for note in provenance["notes"]:
        logger.info("%s: %s", src, note)
    return filler.save(out, overwrite=overwrite, provenance=provenance)


def strip_prefix(name: str, prefixes: tuple[str, ...]) -> str:
    return next(name.removeprefix(prefix) for prefix in prefixes if name.startswith(prefix))


def vision_key(name: str) -> str:
    """A CLIP vision parameter name without the wrappers that vary across versions (`model.`, `vision_model.`)."""
    return name.removeprefix("model.").removeprefix("vision_model.")


def llm_name_of(name: str) -> str | None:
    for theirs, ours in LLM_PREFIXES:
        if name.startswith(theirs):
            return ours + name.removeprefix(theirs)
    return None


def _encoder(src: Path, config: dict[str, Any], vision: dict[str, Any]) -> Component:
    if vision.get("model_type", "clip_vision_model") != "clip_vision_model":
        raise CheckpointError(f"{src}: vision tower {vision.get('model_type')!r} is not supported (only CLIP)")
    layer = config.get("vision_feature_layer", -2)
    if not isinstance(layer, int):
        raise CheckpointError(f"{src}: vision_feature_layer {layer!r} (several layers) is not supported")
    strategy = config.get("vision_feature_select_strategy", "default")
    if strategy not in ("default", "full"):
        raise CheckpointError(f"{src}: vision_feature_select_strategy {strategy!r} is not supported")
    return Component(type="clip-vision",
                     options=dict(config=vision, feature_layer=layer, drop_cls=strategy == "default"))


def _connector(src: Path, config: dict[str, Any]) -> Component:
    act = config.get("projector_hidden_act", "gelu")
    if act != "gelu":
        raise CheckpointError(f"{src}: projector activation {act!r} is not supported (mlp2x_gelu uses exact gelu)")
    return Component(type="mlp2x_gelu")


def _processor(src: Path, vision: dict[str, Any]) -> Component:
    """LLaVA's CLIP preprocessing as far as our image processor goes: square resize to the crop size, CLIP
    normalisation (CLIPImageProcessor resizes the short side and centre-crops, which differs on non-square images)."""
    size = vision.get("image_size", 224)
    settings = read_json(src / "preprocessor_config.json") if (src / "preprocessor_config.json").is_file() else {}
    crop = settings.get("crop_size", size)
    side = crop.get("height", size) if isinstance(crop, dict) else int(crop)
    return Component(type="image", options=dict(size=side, mean=list(settings.get("image_mean", CLIP_MEAN)),
                                                std=list(settings.get("image_std", CLIP_STD))))
