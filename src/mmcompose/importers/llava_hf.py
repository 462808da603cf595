"""Import a transformers LLaVA checkpoint (`LlavaForConditionalGeneration.save_pretrained`) as an image model.

A LLaVA fine-tunes the whole LLM, so its language part is stored here as what it changed: `W_llava - W_base`
on every target linear, as a dense `full` delta serving text and image tokens alike (LLaVA has one set of
weights for all tokens), or compressed to a LoRA of `svd_rank` by truncated SVD, whose relative Frobenius
error is measured exactly from the dropped singular values and recorded in the provenance. Everything else
in the LLM (embeddings, norms, lm_head, biases) must be the base's: we can only represent a change of the
target linears, so any other difference is refused rather than lost. llava-hf appends tokens such as
`<image>` to the vocabulary; those extra embedding rows are dropped (our placeholders never reach the
embedding table) and the base vocabulary's rows must match. Buffers that older checkpoints saved but models
recompute (`position_ids`, `rotary_emb.inv_freq`) are skipped.

The vision tower becomes a `clip-vision` encoder (hidden state `vision_feature_layer`, CLS dropped for the
`default` select strategy) and the projector `linear_1`/`linear_2` a `mlp2x_gelu` connector (`0.*`/`2.*`).
Weights are read tensor by tensor from safetensors, in both the hub layout (`language_model.model.*`) and
the newer one (`model.language_model.*`).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch

from mmcompose.checkpoint import fingerprint_base
from mmcompose.errors import CheckpointError
from mmcompose.files import read_json
from mmcompose.importers._common import Filler, base_config, check_same_llm, hf_config, skeleton
from mmcompose.importers.encoders import CLIP_MEAN, CLIP_STD
from mmcompose.model import Component, DeltaSpec, ModelSpec, modality_spec
from mmcompose.model.routed import DEFAULT_TARGET_MODULES
from mmcompose.tensorfiles import TensorReader, weight_files

logger = logging.getLogger(__name__)

# (prefix in the LLaVA file, prefix in a stock causal LM), longest first.
LLM_PREFIXES = (("language_model.model.", "model."), ("model.language_model.", "model."),
                ("language_model.lm_head.", "lm_head."), ("lm_head.", "lm_head."))
VISION_PREFIXES = ("model.vision_tower.", "vision_tower.")
PROJECTOR_PREFIXES = ("model.multi_modal_projector.", "multi_modal_projector.")
# Buffers older checkpoints saved that the model recomputes (never learned): skipped on both sides.
DERIVED_BUFFERS = ("embeddings.position_ids", "rotary_emb.inv_freq")
PROJECTOR_NAMES = {"linear_1.weight": "0.weight", "linear_1.bias": "0.bias",
                   "linear_2.weight": "2.weight", "linear_2.bias": "2.bias"}


def import_llava_hf(src: Path, out: Path, *, base: Path, svd_rank: int | None = None,
                    overwrite: bool = False) -> Path:
    """Convert the LLaVA in `src` into an mmcompose image model in `out`, as a delta on the base LLM `base`."""
    src, out, base = Path(src), Path(out), Path(base)
    config = read_json(src / "config.json")
    if config.get("model_type") != "llava":
        raise CheckpointError(f"{src}: not a LLaVA checkpoint (model_type {config.get('model_type')!r}; only "
                              f"'llava' is supported)")
    if svd_rank is not None and svd_rank < 1:
        raise CheckpointError(f"svd rank must be at least 1, got {svd_rank}")
    config = hf_config(src).to_dict()  # with what the file left at defaults
    text, vision = config["text_config"], config["vision_config"]
    llm_config = base_config(base)
    check_same_llm(text, llm_config, str(src))
    spec = ModelSpec(
        modalities=[modality_spec("image", encoder=_encoder(src, config, vision), connector=_connector(src, config),
                                  processor=_processor(src, vision))],
        deltas=[DeltaSpec(name="full", kind="dense", routes=["text", "image"], source={"format": "llava-hf"})]
        if svd_rank is None else
        [DeltaSpec(name="shared", kind="lora", routes=["text", "image"], rank=svd_rank, alpha=float(svd_rank),
                   source={"format": "llava-hf", "svd_rank": svd_rank})],
        target_modules=list(DEFAULT_TARGET_MODULES), template="tagged",
        strategy="full" if svd_rank is None else "shared",
    )
    model = skeleton(base, spec, fingerprint_base(base))
    filler = Filler(model, str(src))
    encoder_names = {_vision_key(name): name for name in model.branches["image"].encoder.state_dict()}
    delta_name = spec.deltas[0].name
    linears = {f"{path}.weight": path for path in model.routed}
    svd = _SVDReport(svd_rank)
    notes: list[str] = []
    seen_base: set[str] = set()
    with TensorReader(weight_files(src)) as llava, TensorReader(weight_files(base)) as original:
        for name in sorted(llava.names()):
            if name.endswith(DERIVED_BUFFERS):
                continue
            value = llava.get(name)
            llm_name = _llm_name(name)
            if llm_name is not None:
                base_name = _base_name(llm_name, original, llm_config, src)
                seen_base.add(base_name)
                reference = original.get(base_name)
                if llm_name in linears:
                    path = linears[llm_name]
                    difference = value.float() - reference.float()
                    if svd_rank is None:
                        filler.put(f"deltas.{delta_name}.{path}.weight", difference, name)
                    else:
                        lora_a, lora_b = svd.factor(difference)
                        filler.put(f"deltas.{delta_name}.{path}.lora_A", lora_a, name)
                        filler.put(f"deltas.{delta_name}.{path}.lora_B", lora_b, name)
                else:
                    notes += _check_unchanged(name, value, reference, text, llm_config, src)
            elif name.startswith(VISION_PREFIXES):
                key = _vision_key(_strip(name, VISION_PREFIXES))
                if key not in encoder_names:
                    raise CheckpointError(f"{src}: vision tower tensor {name} has no place in a CLIP vision model")
                filler.put(f"modalities.image.encoder.{encoder_names[key]}", value, name)
            elif name.startswith(PROJECTOR_PREFIXES) and _strip(name, PROJECTOR_PREFIXES) in PROJECTOR_NAMES:
                filler.put(f"modalities.image.connector.{PROJECTOR_NAMES[_strip(name, PROJECTOR_PREFIXES)]}", value,
                           name)
            else:
                raise CheckpointError(f"{src}: unknown tensor {name}")
        unmatched = sorted(name for name in set(original.names()) - seen_base if not name.endswith(DERIVED_BUFFERS))
    if unmatched:
        raise CheckpointError(f"{src}: the LLaVA has no counterpart of the base LLM's {unmatched[0]}")
    if config.get("multimodal_projector_bias") is False:  # no biases stored: zero biases are the same map
        for name in ("modalities.image.connector.0.bias", "modalities.image.connector.2.bias"):
            filler.put(name, torch.zeros_like(filler.targets[name]))
    provenance: dict[str, Any] = {"imported_from": "llava-hf", "source": str(src.resolve())}
    if svd_rank is not None:
        provenance.update(svd.summary())
        notes.append(f"LLM delta compressed to rank {svd_rank}: relative Frobenius error "
                     f"{provenance['svd_relative_error']:.3g} "
                     f"(worst layer {provenance['svd_max_layer_relative_error']:.3g})")
    provenance["notes"] = sorted(set(notes))
    for note in provenance["notes"]:
        logger.info("%s: %s", src, note)
    return filler.save(out, overwrite=overwrite, provenance=provenance)


def _strip(name: str, prefixes: tuple[str, ...]) -> str:
    return next(name.removeprefix(prefix) for prefix in prefixes if name.startswith(prefix))


def _vision_key(name: str) -> str:
    """A CLIP vision parameter name without the wrappers that vary across versions (`model.`, `vision_model.`)."""
    return name.removeprefix("model.").removeprefix("vision_model.")


def _llm_name(name: str) -> str | None:
    for theirs, ours in LLM_PREFIXES:
        if name.startswith(theirs):
            return ours + name.removeprefix(theirs)
    return None


def _base_name(llm_name: str, original: TensorReader, llm_config: dict[str, Any], src: Path) -> str:
    if llm_name in original:
        return llm_name
    if llm_name == "lm_head.weight" and llm_config.get("tie_word_embeddings"):
        return "model.embed_tokens.weight"
    raise CheckpointError(f"{src}: the LLaVA's LLM has {llm_name}, which the base LLM does not")


def _check_unchanged(name: str, value: torch.Tensor, reference: torch.Tensor, text: dict[str, Any],
                     llm_config: dict[str, Any], src: Path) -> list[str]:
    """Refuse any change outside the target linears; drop the rows of tokens the LLaVA appended to the vocabulary."""
    notes = []
    vocab, base_vocab = text.get("vocab_size"), llm_config.get("vocab_size")
    if value.shape != reference.shape:
        appended = (value.dim() == 2 and value.shape[1:] == reference.shape[1:] and value.shape[0] == vocab
                    and reference.shape[0] == base_vocab)
        if not appended:
            raise CheckpointError(f"{src}: {name} has shape {tuple(value.shape)}, the base LLM's has "
                                  f"{tuple(reference.shape)}")
        value = value[:base_vocab]
        notes.append(f"dropped {vocab - base_vocab} vocabulary row(s) the LLaVA appended (e.g. <image>) "
                     f"beyond the base's {base_vocab}")
    common = value.dtype if value.element_size() < reference.element_size() else reference.dtype
    if not torch.equal(value.to(common), reference.to(common)):
        raise CheckpointError(f"{src}: {name} differs from the base LLM's; only the target linears "
                              f"({', '.join(DEFAULT_TARGET_MODULES)}) can carry the fine-tune")
    return notes


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


class _SVDReport:
    """Truncated SVD of each delta, with the exact error: `||D - D_r||_F^2` is the sum of the dropped `sigma^2`."""

    def __init__(self, rank: int | None) -> None:
        self.rank = rank
        self.dropped = self.total = 0.0
        self.worst = 0.0

    def factor(self, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`(A, B)` with `B @ A` the best rank-`rank` approximation; zero-padded where `delta` has lower rank."""
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        keep = min(self.rank, s.numel())
        lora_a = torch.zeros(self.rank, delta.shape[1])
        lora_b = torch.zeros(delta.shape[0], self.rank)
        lora_a[:keep] = vh[:keep]
        lora_b[:, :keep] = u[:, :keep] * s[:keep]
        energy, lost = float(s.double().pow(2).sum()), float(s[keep:].double().pow(2).sum())
        self.total, self.dropped = self.total + energy, self.dropped + lost
        self.worst = max(self.worst, math.sqrt(lost / energy) if energy else 0.0)
        return lora_a, lora_b

    def summary(self) -> dict[str, float | int]:
        overall = math.sqrt(self.dropped / self.total) if self.total else 0.0
        return {"svd_rank": self.rank, "svd_relative_error": overall, "svd_max_layer_relative_error": self.worst}
