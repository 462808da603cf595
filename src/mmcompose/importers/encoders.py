"""Where an encoder comes from: one resolver for `import modelcompose --encoder` and `train modality --encoder`.

A source is one of
* a `Component` (its registered factory builds the weights; random for the built-in small encoders),
* a registered encoder name, optionally with JSON options: `whisper-audio`, `point-bert:{"depth": 12}`,
* a JSON file holding a `{"type", "options"}` component,
* an mmcompose checkpoint directory that has the modality (its encoder, processor and weights are reused),
* a local transformers directory: CLIP (image or video), Whisper or CLAP (audio),
* a BEATs checkpoint for audio: the released `.pt` (config embedded) or a `config.json` + safetensors directory,
* a `LanguageBind_Video_merge` directory (CLIP with temporal attention) for video,
* a `LanguageBind_Image` directory for images: its vision tower is a plain CLIP ViT (LanguageBind's temporal
  attention is off for images, `add_time_attn: false`, and patch dropout acts only in training), so it becomes a
  `clip-vision` encoder holding LanguageBind_Image's `vision_model.*` weights (the text tower is not used),
* a Point-BERT state-dict file (`.pt`, `.pth`, `.bin`, `.safetensors`) for point clouds; a component JSON of
  type `point-bert` may name its `weights` file and so fix the architecture instead of reading it off the
  tensors.

Weights read from a checkpoint, a directory or a state-dict file are *pretrained*: training freezes them and
runs them in eval mode unless asked otherwise. Nothing is downloaded; a name that is neither a local path nor a
registered encoder is a one-line error that lists both possibilities.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from mmcompose.checkpoint import MANIFEST_NAME, checkpoint_files, read_manifest, read_tensors
from mmcompose.errors import CheckpointError, MMComposeError
from mmcompose.files import read_json
from mmcompose.modalities import get_modality
from mmcompose.modalities._local import load_strict
from mmcompose.modalities.beats import BEATsEncoder
from mmcompose.modalities.clap import CLAPAudioEncoder
from mmcompose.modalities.clip import CLIPVisionEncoder
from mmcompose.modalities.languagebind import LanguageBindVideoEncoder
from mmcompose.modalities.point_bert import PointBERTEncoder
from mmcompose.modalities.registry import ENCODERS
from mmcompose.modalities.whisper import WhisperAudioEncoder
from mmcompose.model import Component
from mmcompose.tensorfiles import load_state_dict

# CLIP's own normalisation, used when a CLIP directory has no preprocessor_config.json.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
STATE_DICT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")

EncoderSource = Component | Path | str


@dataclass(frozen=True)
class ResolvedEncoder:
    """An encoder component, the processor that feeds it, and its weights when they came from files."""

    component: Component
    processor: Component
    tensors: dict[str, torch.Tensor] | None  # None: the component's own factory provides the weights
    description: str

    @property
    def pretrained(self) -> bool:
        return self.tensors is not None


def parse_encoder_option(item: str) -> tuple[str, EncoderSource]:
    """`MODALITY=SPEC` from the command line: SPEC is an existing local path or a registered encoder name
    with optional JSON options (`NAME` or `NAME:{...}`)."""
    modality, separator, spec = item.partition("=")
    if not separator or not modality.strip() or not spec.strip():
        raise MMComposeError(f"--encoder expects MODALITY=SPEC, got {item!r}")
    spec = spec.strip()
    if Path(spec).exists():
        return modality.strip(), Path(spec)
    if spec.partition(":")[0] not in ENCODERS:
        raise MMComposeError(f"--encoder {item!r}: {spec!r} is neither a local path nor a registered encoder "
                             f"({', '.join(sorted(ENCODERS))})")
    return modality.strip(), named_component(spec, f"--encoder {item!r}")


def named_component(text: str, option: str) -> Component:
    """`NAME` or `NAME:{json options}` (a registered encoder or connector with its options) as a `Component`;
    malformed options are a one-line error naming `option`."""
    name, _, options = text.partition(":")
    try:
        parsed = json.loads(options) if options else {}
    except json.JSONDecodeError as error:
        raise MMComposeError(f"{option}: options after ':' must be a JSON object ({error.msg})") from None
    if not isinstance(parsed, dict):
        raise MMComposeError(f"{option}: options after ':' must be a JSON object")
    return Component(type=name, options=parsed)


def resolve_encoder(modality: str, source: EncoderSource, *, clip_layer: int = -2,
                    clip_feature: str = "patch") -> ResolvedEncoder:
    """The encoder `source` names for `modality` (ours: `image`, `audio`, `video`, `point`, or a registered one).

    `clip_layer` and `clip_feature` (`patch` drops CLS, `cls_patch` keeps it) select CLIP's features, as
    LLaVA's `mm_vision_select_layer` / `mm_vision_select_feature` do; the defaults are LLaVA-1.5's. A
    LanguageBind video tower takes its features from `clip_layer` too (all tokens, CLS included, as the
    official tower hands them on).
    """
    default = get_modality(modality)
    default_processor = Component(type=default.processor, options=default.processor_options)
    if isinstance(source, Component):
        return ResolvedEncoder(source, default_processor, None, f"component {source.type}")
    path = Path(source)
    if path.is_file() and path.suffix == ".json":
        raw = read_json(path)
        weights = raw.pop("weights", None) if isinstance(raw, dict) else None
        try:
            component = Component.model_validate(raw)
        except ValidationError as error:
            raise CheckpointError(f"{path}: not an encoder component ({error.errors()[0]['msg']})") from None
        if weights is not None:
            if component.type != "point-bert":
                raise CheckpointError(f"{path}: weights: only a point-bert component takes a weights file")
            return _point_bert(path.parent / str(weights), modality, component.options)
        return ResolvedEncoder(component, default_processor, None, f"component {component.type} from {path}")
    if path.is_file() and path.suffix in STATE_DICT_SUFFIXES:
        if modality == "audio":
            return _beats(path, modality)
        if modality != "point":
            raise CheckpointError(f"{path}: a state-dict file is read as a BEATs audio or Point-BERT point encoder, "
                                  f"not for {modality!r}; give a model directory or a component instead")
        return _point_bert(path, modality)
    if (path / MANIFEST_NAME).is_file():
        return _from_checkpoint(path, modality)
    if (path / "config.json").is_file():
        return _from_directory(path, modality, default_processor, clip_layer, clip_feature)
    raise CheckpointError(f"{path}: not a model directory (CLIP, Whisper, CLAP, BEATs, LanguageBind), an mmcompose "
                          f"checkpoint, a BEATs or Point-BERT state-dict file or a component JSON file")


def _weights(encoder: torch.nn.Module, kind: str, processor: Component, description: str) -> ResolvedEncoder:
    return ResolvedEncoder(Component(type=kind, options=encoder.options), processor, encoder.state_dict(),
                           description)


def _from_checkpoint(path: Path, modality: str) -> ResolvedEncoder:
    manifest = read_manifest(path)
    spec = next((m for m in manifest.model.modalities if m.name == modality), None)
    if spec is None:
        have = ", ".join(m.name for m in manifest.model.modalities) or "none"
        raise CheckpointError(f"{path}: has no {modality!r} modality to take an encoder from (it has: {have})")
    prefix = f"modalities.{modality}.encoder."
    tensors = {name.removeprefix(prefix): value
               for name, value in read_tensors(checkpoint_files(path, manifest.files)).items()
               if name.startswith(prefix)}
    return ResolvedEncoder(spec.encoder, spec.processor, tensors, f"{spec.encoder.type} from checkpoint {path}")


def _from_directory(path: Path, modality: str, default_processor: Component, clip_layer: int,
                    clip_feature: str) -> ResolvedEncoder:
    config = read_json(path / "config.json")
    vision = config.get("vision_config", config)
    if isinstance(vision, dict) and vision.get("add_time_attn"):
        return _languagebind(path, modality, clip_layer)
    if isinstance(vision, dict) and "add_time_attn" in vision:
        return _languagebind_image(path, modality, vision, clip_layer, clip_feature)
    if "beats_cfg" in config or "encoder_embed_dim" in config.get("cfg", config):
        return _beats(path, modality)
    model_type = config.get("model_type")
    if model_type in ("clip", "clip_vision_model"):
        if modality not in ("image", "video"):
            raise CheckpointError(f"{path}: a CLIP directory can serve image or video, not {modality}")
        return _clip(path, modality, clip_layer, clip_feature)
    if model_type == "whisper":
        _audio_only(path, modality, "Whisper")
        encoder = WhisperAudioEncoder.from_pretrained(path)
        processor = Component(type=default_processor.type, options={
            **default_processor.options, "sample_rate": encoder.sampling_rate, "num_samples": encoder.n_samples})
        return _weights(encoder, "whisper-audio", processor, f"whisper-audio from {path}")
    if model_type in ("clap", "clap_audio_model"):
        _audio_only(path, modality, "CLAP")
        encoder = CLAPAudioEncoder.from_pretrained(path)
        rate = encoder.features.sampling_rate
        processor = Component(type=default_processor.type, options={
            **default_processor.options, "sample_rate": rate, "num_samples": round(encoder.features.nb_max_samples)})
        return _weights(encoder, "clap-audio", processor, f"clap-audio from {path}")
    raise CheckpointError(f"{path}: a {model_type!r} model; local directories of CLIP, Whisper, CLAP, BEATs or "
                          f"LanguageBind are read as encoders; pass a component for this one instead")


def _beats(path: Path, modality: str) -> ResolvedEncoder:
    """A released BEATs checkpoint with the official processor (16 kHz Kaldi fbank)."""
    _audio_only(path, modality, "BEATs")
    encoder = BEATsEncoder.from_checkpoint(path)
    return _weights(encoder, "beats", Component(type="beats-fbank"), f"beats from {path}")


def _languagebind(path: Path, modality: str, layer: int) -> ResolvedEncoder:
    """LanguageBind video at the selected layer, with its processor (uniformly sampled frames, CLIP pixels)."""
    if modality != "video":
        raise CheckpointError(f"{path}: a LanguageBind video checkpoint serves video, not {modality}")
    encoder = LanguageBindVideoEncoder.from_pretrained(path, feature_layer=layer)
    vision = encoder.options["config"]
    processor = Component(type="languagebind-video",
                          options=dict(num_frames=vision["num_frames"], size=vision["image_size"]))
    return _weights(encoder, "languagebind-video", processor, f"languagebind-video from {path}")


# The LanguageBind vision-config fields that are CLIP's (the rest, e.g. `add_time_attn`, LoRA and patch-dropout
# settings, do not change the inference forward of an image tower).
CLIP_VISION_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels",
                      "image_size", "patch_size", "layer_norm_eps", "hidden_act", "projection_dim")


def _languagebind_image(path: Path, modality: str, vision: dict[str, Any], layer: int,
                        feature: str) -> ResolvedEncoder:
    """LanguageBind_Image's vision tower as the CLIP ViT it is, with CLIP preprocessing at its image size."""
    if modality != "image":
        raise CheckpointError(f"{path}: a LanguageBind image tower (add_time_attn false) serves image, not {modality}")
    if feature not in ("patch", "cls_patch"):
        raise CheckpointError(f"{path}: unsupported feature selection {feature!r} (expected 'patch' or 'cls_patch')")
    config = {key: vision[key] for key in CLIP_VISION_FIELDS if key in vision}
    try:
        encoder = CLIPVisionEncoder(config, feature_layer=layer, drop_cls=feature == "patch")
    except (ValueError, TypeError, KeyError) as error:
        raise CheckpointError(f"{path / 'config.json'}: bad vision_config ({error})") from None
    weights_file = next((path / name for name in ("model.safetensors", "weights.safetensors", "pytorch_model.bin")
                         if (path / name).is_file()), None)
    if weights_file is None:
        raise CheckpointError(f"{path}: no model.safetensors, weights.safetensors or pytorch_model.bin")
    ours = {_clip_key(key): key for key in encoder.model.state_dict()}
    weights = {ours.get(_clip_key(key), key): value for key, value in load_state_dict(weights_file).items()
               if key.startswith("vision_model.") and not key.endswith("position_ids")}
    load_strict(encoder.model, weights, str(weights_file), "LanguageBind image (CLIP vision)")
    size = encoder.model.config.image_size
    processor = Component(type="clip-image", options=dict(size=size, crop_size=size, image_mean=list(CLIP_MEAN),
                                                          image_std=list(CLIP_STD)))
    return _weights(encoder, "clip-vision", processor, f"clip-vision with LanguageBind_Image weights from {path}")


def _clip_key(name: str) -> str:
    """A CLIP vision parameter name without the `vision_model.` wrapper, which transformers versions differ on."""
    return name.removeprefix("vision_model.")


def _point_bert(path: Path, modality: str, options: dict[str, Any] | None = None) -> ResolvedEncoder:
    """A Point-BERT state dict (ModelCompose's `point_bert_v1.2.pt`). Without `options`, the architecture is read
    from the tensors where they show it (width, depth, group-encoder width, xyz or xyz+rgb) and is otherwise
    Point-BERT v1.2's (6 heads, groups of 32, 512 groups); 8192 points per cloud, as the released model reads them."""
    if modality != "point":
        raise CheckpointError(f"{path}: a Point-BERT state dict serves point clouds, not {modality}")
    if options is None:
        weights = load_state_dict(path, unwrap="state_dict")

        def find(suffix: str) -> torch.Tensor:
            value = next((v for k, v in weights.items() if k.endswith(suffix)), None)
            if value is None:
                raise CheckpointError(f"{path}: not a Point-BERT state dict (no {suffix})")
            return value

        depth = len({k.split("blocks.blocks.")[1].split(".")[0] for k in weights if "blocks.blocks." in k})
        options = dict(trans_dim=int(find("cls_token").shape[-1]), depth=depth,
                       encoder_dims=int(find("reduce_dim.weight").shape[1]),
                       point_dims=int(find("encoder.first_conv.0.weight").shape[1]))
    encoder = PointBERTEncoder.from_state_dict_file(path, **options)
    default = get_modality(modality)
    processor = Component(type=default.processor, options={
        **default.processor_options, "num_points": 8192, "with_color": encoder.point_dims == 6})
    return _weights(encoder, "point-bert", processor, f"point-bert from {path}")


def _audio_only(path: Path, modality: str, family: str) -> None:
    if modality != "audio":
        raise CheckpointError(f"{path}: a {family} directory serves audio, not {modality}")


def _clip(path: Path, modality: str, layer: int, feature: str) -> ResolvedEncoder:
    """CLIP features as LLaVA's tower selects them: hidden state `layer`, CLS dropped for `patch`."""
    if feature not in ("patch", "cls_patch"):
        raise CheckpointError(f"{path}: unsupported feature selection {feature!r} (expected 'patch' or 'cls_patch')")
    encoder = CLIPVisionEncoder.from_pretrained(str(path), feature_layer=layer, drop_cls=feature == "patch")
    vision = encoder.model.config
    processor_file = path / "preprocessor_config.json"
    processor_config: dict[str, Any] = read_json(processor_file) if processor_file.is_file() else {}
    crop = processor_config.get("crop_size", vision.image_size)
    size = crop.get("height", vision.image_size) if isinstance(crop, dict) else int(crop)
    default = get_modality(modality)
    options = {**default.processor_options, "size": size,
               "mean": list(processor_config.get("image_mean", CLIP_MEAN)),
               "std": list(processor_config.get("image_std", CLIP_STD))}
    return _weights(encoder, "clip-vision", Component(type=default.processor, options=options),
                    f"clip-vision from {path}")


__all__ = ["EncoderSource", "ResolvedEncoder", "named_component", "parse_encoder_option", "resolve_encoder"]
