"""Import Video-LLaVA (PKU-YuanGroup, on vicuna-7b-v1.5) as an image + video model, from either released layout.

The layout is read off `config.json`:

* **original** (`LlavaLlamaForCausalLM`, `mm_image_tower` LanguageBind_Image, `mm_video_tower`
  LanguageBind_Video_merge): weights `model.*` / `lm_head.weight` (the LLM), `model.mm_projector.{0,2}.*`
  (`mlp2x_gelu`) or `model.mm_projector.*` (`linear`), in safetensors or pickled `pytorch_model*.bin` shards.
  The towers are separate releases the user supplies (`encoders`): LanguageBind_Image's vision tower is a plain
  CLIP ViT (its temporal attention is off for images) and becomes a `clip-vision` encoder with those weights;
  LanguageBind_Video_merge becomes our `languagebind-video` encoder. Both take hidden state
  `mm_vision_select_layer`; images drop CLS (`mm_vision_select_feature: patch`, 256 tokens at 224 px), videos
  keep every token of every frame (8 x 257), as the official towers return them. Tower weights the checkpoint
  itself holds (`model.image_tower.image_tower.*`, `model.video_tower.video_tower.*`) must equal the
  supplied ones.
* **-hf** (`VideoLlavaForConditionalGeneration`, `model_type: video_llava`): keys `language_model.*`,
  `image_tower.*`, `video_tower.*`, `multi_modal_projector.linear_{1,2}.*` (or the newer `model.` prefixed
  layout). Both towers are plain `CLIPVisionModel`s at 224 px, stored in the checkpoint: images take hidden
  state `vision_feature_layer` without CLS, videos run each frame through the video tower and keep CLS. The
  conversion to this layout dropped LanguageBind's temporal attention, so this video encoder is per-frame CLIP:
  the provenance says so.

The LLM is fully fine-tuned: its change on the base becomes one delta serving text, image and video tokens
(dense `full`, or a rank-`svd_rank` LoRA with its SVD error reported; `LLMChange`), and the vocabulary rows
Video-LLaVA appended (`<image>`, `<video>`, padding to 32064) are dropped and recorded.

Video-LLaVA has ONE projector for both modalities. It is stored as two connectors with equal weights, one per
branch, because a modality here is a self-contained branch (encoder -> connector): composition renames,
removes and routes branches one by one, and the llava-hf export takes a single one. The cost is one extra copy
of the projector (21M parameters at 7B size, 0.3% of the dense delta); the two copies only diverge if one
branch is trained further, which is then what the user asked for.

Video frames form one `<video>` span of T x 257 contiguous tokens, as the official evaluation lays them out
(`<image>` repeated T times with nothing between; the official demo puts a space between frames) and as the
-hf processor expands `<video>`.
"""

from __future__ import annotations

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
from mmcompose.importers.encoders import CLIP_MEAN, CLIP_STD, EncoderSource, ResolvedEncoder, resolve_encoder
from mmcompose.importers.llava_hf import PROJECTOR_NAMES, PROJECTOR_PREFIXES, llm_name_of, strip_prefix, vision_key
from mmcompose.importers.modelcompose import CONNECTOR_KEYS
from mmcompose.model import Component, ModelSpec, modality_spec
from mmcompose.model.routed import DEFAULT_TARGET_MODULES
from mmcompose.tensorfiles import TensorReader, weight_files

MODALITIES = ("image", "video")
HF_TOWERS = {"image": ("model.image_tower.", "image_tower."), "video": ("model.video_tower.", "video_tower.")}
ORIGINAL_TOWERS = {"image": "model.image_tower.image_tower.", "video": "model.video_tower.video_tower."}
ORIGINAL_PROJECTOR = "model.mm_projector."
SHARED_PROJECTOR_NOTE = ("the image and video connectors are two equal copies of the one projector Video-LLaVA "
                         "shares between them")


def import_video_llava(src: Path, out: Path, *, base: Path, svd_rank: int | None = None,
                       encoders: dict[str, EncoderSource] | None = None, template: str = "vicuna_v1",
                       overwrite: bool = False) -> Path:
    """Convert the Video-LLaVA in `src` (either layout) into an mmcompose image + video model in `out`.

    `encoders` (original layout only) maps `image` and `video` to the LanguageBind_Image and
    LanguageBind_Video_merge directories (or any source `resolve_encoder` reads). `template` is the
    conversation layout recorded: Video-LLaVA was trained with LLaVA's `llava_v1` conversation, which is
    `vicuna_v1`'s layout with a system prompt that says "human" where vicuna_v1 says "user".
    """
    src, out, base = Path(src), Path(out), Path(base)
    raw = read_json(src / "config.json")
    template = check_template(template)
    if raw.get("model_type") == "video_llava":
        if encoders:
            raise CheckpointError(f"{src}: a Video-LLaVA-hf checkpoint holds both towers; --encoder is only for "
                                  f"the original layout")
        layout: _Layout = _HFLayout(src, base)
    elif raw.get("mm_image_tower") or raw.get("mm_video_tower"):
        layout = _OriginalLayout(src, base, raw, encoders or {})
    else:
        raise CheckpointError(f"{src}: not a Video-LLaVA checkpoint (config.json has neither model_type "
                              f"'video_llava' nor mm_image_tower / mm_video_tower)")
    deltas = llm_delta_specs(svd_rank, ["text", *MODALITIES], {"format": layout.name})
    spec = ModelSpec(
        modalities=[modality_spec(m, encoder=layout.encoders[m], connector=layout.connector,
                                  processor=layout.processors[m]) for m in MODALITIES],
        deltas=deltas, target_modules=list(DEFAULT_TARGET_MODULES), template=template,
        strategy="full" if svd_rank is None else "shared",
    )
    model = skeleton(base, spec, fingerprint_base(base))
    filler = Filler(model, str(src))
    layout.bind(model)
    with TensorReader(weight_files(base)) as original, \
            LLMChange(filler, original, layout.llm_config, layout.vocab_size, deltas[0], str(src)) as change:
        for name, value in source_tensors(src):
            if not name.endswith(DERIVED_BUFFERS):
                layout.take(name, value, filler, change)
        changed = change.finish()
    layout.finish(filler)
    notes = sorted({*changed.pop("notes"), SHARED_PROJECTOR_NOTE, *layout.notes(template)})
    provenance = {"imported_from": layout.name, "source": str(src.resolve()), **changed, "notes": notes,
                  "encoders": layout.descriptions}
    return filler.save(out, overwrite=overwrite, provenance=provenance)


class _Layout:
    """What differs between the two layouts: the spec's parts, and where each source tensor goes."""

    name: str
    encoders: dict[str, Component]
    processors: dict[str, Component]
    connector: Component
    llm_config: dict[str, Any]
    vocab_size: int
    descriptions: dict[str, str]

    def bind(self, model: Any) -> None:
        """Know the model being filled (its encoders' parameter names), refusing an encoder whose width is not the
        projector's input before any tensor is read."""

    def take(self, name: str, value: torch.Tensor, filler: Filler, change: LLMChange) -> None:
        raise NotImplementedError

    def finish(self, filler: Filler) -> None:
        """Fill what the checkpoint does not hold."""

    def notes(self, template: str) -> list[str]:
        return [] if template != "vicuna_v1" else [
            "template vicuna_v1: Video-LLaVA was trained with llava_v1, the same layout whose system prompt says "
            "'human' where vicuna_v1 says 'user'"]

    def put_projector(self, filler: Filler, key: str, value: torch.Tensor, name: str) -> None:
        for modality in MODALITIES:
            filler.put(f"modalities.{modality}.connector.{key}", value, name)


class _HFLayout(_Layout):
    name = "video-llava-hf"

    def __init__(self, src: Path, base: Path) -> None:
        self.src = src
        config = hf_config(src).to_dict()
        text, vision = config["text_config"], config["vision_config"]
        self.llm_config = base_config(base)
        check_same_llm(text, self.llm_config, str(src))
        self.vocab_size = int(text["vocab_size"])
        layer, strategy = config.get("vision_feature_layer", -2), config.get("vision_feature_select_strategy")
        if not isinstance(layer, int):
            raise CheckpointError(f"{src}: vision_feature_layer {layer!r} (several layers) is not supported")
        if strategy not in ("default", "full"):
            raise CheckpointError(f"{src}: vision_feature_select_strategy {strategy!r} is not supported")
        if vision.get("model_type", "clip_vision_model") != "clip_vision_model":
            raise CheckpointError(f"{src}: vision tower {vision.get('model_type')!r} is not supported (only CLIP)")
        if config.get("projector_hidden_act", "gelu") != "gelu":
            raise CheckpointError(f"{src}: projector activation {config['projector_hidden_act']!r} is not supported")
        self.projector_bias = config.get("multimodal_projector_bias", True)
        self._check_vocabulary(config)
        per_frame = (vision["image_size"] // vision["patch_size"]) ** 2 + 1
        frames, rest = divmod(int(config.get("video_seq_length", 8 * per_frame)), per_frame)
        if rest or not frames:
            raise CheckpointError(f"{src}: video_seq_length {config.get('video_seq_length')} is not a whole number "
                                  f"of frames of {per_frame} tokens (the video tower's patches + CLS)")
        self.encoders = {
            "image": Component(type="clip-vision", options=dict(config=vision, feature_layer=layer,
                                                                drop_cls=strategy == "default")),
            "video": Component(type="clip-vision", options=dict(config=vision, feature_layer=layer, drop_cls=False)),
        }
        settings = read_json(src / "preprocessor_config.json") if (src / "preprocessor_config.json").is_file() else {}
        crop = settings.get("crop_size", vision["image_size"])
        side = crop.get("height", vision["image_size"]) if isinstance(crop, dict) else int(crop)
        mean, std = list(settings.get("image_mean", CLIP_MEAN)), list(settings.get("image_std", CLIP_STD))
        self.processors = {
            "image": Component(type="clip-image", options=dict(size=side, crop_size=side, image_mean=mean,
                                                               image_std=std)),
            "video": Component(type="languagebind-video", options=dict(num_frames=frames, size=side, mean=mean,
                                                                       std=std)),
        }
        self.connector = Component(type="mlp2x_gelu")
        self.descriptions = {m: f"clip-vision ({m}_tower of {src})" for m in MODALITIES}
        self.encoder_names: dict[str, dict[str, str]] = {}

    def _check_vocabulary(self, config: dict[str, Any]) -> None:
        base_vocab, vocab = self.llm_config.get("vocab_size", 0), self.vocab_size
        for field in ("image_token_id", "video_token_id"):
            token = config.get(field, config.get(field.replace("_id", "_index")))
            if not isinstance(token, int) or not base_vocab <= token < vocab:
                raise CheckpointError(f"{self.src}: config.json {field} {token!r} is not one of the rows the "
                                      f"checkpoint appended to the base vocabulary ({base_vocab}..{vocab - 1})")

    def bind(self, model: Any) -> None:
        self.encoder_names = {m: {vision_key(name): name for name in model.branches[m].encoder.state_dict()}
                              for m in MODALITIES}

    def take(self, name: str, value: torch.Tensor, filler: Filler, change: LLMChange) -> None:
        llm_name = llm_name_of(name)
        if llm_name is not None:
            change.add(llm_name, value, name)
            return
        for modality, prefixes in HF_TOWERS.items():
            if name.startswith(prefixes):
                key = vision_key(strip_prefix(name, prefixes))
                if key not in self.encoder_names[modality]:
                    raise CheckpointError(f"{self.src}: {modality} tower tensor {name} has no place in the CLIP "
                                          f"vision model its config describes")
                filler.put(f"modalities.{modality}.encoder.{self.encoder_names[modality][key]}", value, name)
                return
        if name.startswith(PROJECTOR_PREFIXES) and strip_prefix(name, PROJECTOR_PREFIXES) in PROJECTOR_NAMES:
            self.put_projector(filler, PROJECTOR_NAMES[strip_prefix(name, PROJECTOR_PREFIXES)], value, name)
            return
        raise CheckpointError(f"{self.src}: unknown tensor {name}")

    def finish(self, filler: Filler) -> None:
        if self.projector_bias is False:  # no biases stored: zero biases are the same map
            for key in ("0.bias", "2.bias"):
                self.put_projector(filler, key, torch.zeros_like(filler.targets[f"modalities.image.connector.{key}"]),
                                   "multimodal_projector_bias=false")

    def notes(self, template: str) -> list[str]:
        return [*super().notes(template),
                "video encoder: per-frame CLIP as the -hf checkpoint holds it; LanguageBind's temporal attention is "
                "absent (the conversion to the -hf layout dropped it), so video features differ from the original "
                "Video-LLaVA-7B's",
                "video frames are sampled and preprocessed as LanguageBind does (bilinear short-side resize, centre "
                "crop); the -hf processor resizes each frame bicubically"]


class _OriginalLayout(_Layout):
    name = "video-llava"

    def __init__(self, src: Path, base: Path, config: dict[str, Any], encoders: dict[str, EncoderSource]) -> None:
        self.src = src
        missing = [key for key in ("mm_image_tower", "mm_video_tower") if not config.get(key)]
        if missing:
            raise CheckpointError(f"{src}: config.json has no {missing[0]} (an image + video Video-LLaVA has both)")
        self.llm_config = base_config(base)
        check_same_llm({**config, "model_type": "llama"}, self.llm_config, str(src))  # LlavaConfig is a LlamaConfig
        self.vocab_size = int(config.get("vocab_size", 0))
        self.width = config.get("mm_hidden_size")
        if not isinstance(self.width, int):
            raise CheckpointError(f"{src}: config.json has no integer mm_hidden_size")
        kind = str(config.get("mm_projector_type", "linear"))
        if kind not in CONNECTOR_KEYS:
            raise CheckpointError(f"{src / 'config.json'}: mm_projector_type {kind!r} is not supported "
                                  f"(importable: {', '.join(CONNECTOR_KEYS)})")
        self.connector, self.projector_keys = Component(type=kind), CONNECTOR_KEYS[kind]
        layer = int(config.get("mm_vision_select_layer", -2))
        feature = str(config.get("mm_vision_select_feature", "patch"))
        extra = sorted(set(encoders) - set(MODALITIES))
        absent = [m for m in MODALITIES if m not in encoders]
        if extra or absent:
            towers = {"image": config["mm_image_tower"], "video": config["mm_video_tower"]}
            problem = (f"encoders given for {', '.join(extra)}, which Video-LLaVA does not have" if extra else
                       "the original Video-LLaVA checkpoint does not contain its towers; supply "
                       + " and ".join(f"--encoder {m}=PATH ({towers[m]})" for m in absent))
            raise CheckpointError(f"{src}: {problem}")
        self.resolved: dict[str, ResolvedEncoder] = {
            "image": resolve_encoder("image", encoders["image"], clip_layer=layer, clip_feature=feature),
            "video": resolve_encoder("video", encoders["video"], clip_layer=layer),
        }
        if self.resolved["video"].component.type != "languagebind-video":
            raise CheckpointError(f"{encoders['video']}: the original Video-LLaVA's video tower is "
                                  f"LanguageBind_Video_merge (a languagebind-video encoder), not "
                                  f"{self.resolved['video'].component.type}")
        if self.resolved["image"].component.type != "clip-vision":
            raise CheckpointError(f"{encoders['image']}: the original Video-LLaVA's image tower is LanguageBind_Image "
                                  f"(a CLIP ViT), not {self.resolved['image'].component.type}")
        image_options = self.resolved["image"].component.options["config"]
        side = int(image_options.get("image_size", 224))
        self.encoders = {m: self.resolved[m].component for m in MODALITIES}
        video_config = self.resolved["video"].component.options["config"]
        self.processors = {
            "image": Component(type="clip-image", options=dict(
                size=side, crop_size=side, image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD),
                pad_to_square=config.get("image_aspect_ratio") == "pad")),
            "video": Component(type="languagebind-video", options=dict(num_frames=video_config["num_frames"],
                                                                       size=video_config["image_size"])),
        }
        self.descriptions = {m: self.resolved[m].description for m in MODALITIES}
        self.tower_names: dict[str, dict[str, str]] = {}

    def bind(self, model: Any) -> None:
        for modality in MODALITIES:
            width = model.branches[modality].encoder.output_dim
            if width != self.width:
                raise CheckpointError(f"{self.src}: the {modality} encoder given outputs width {width}, but the "
                                      f"checkpoint's mm_hidden_size is {self.width}")
            self.tower_names[modality] = {vision_key(name): name for name in self.resolved[modality].tensors}

    def take(self, name: str, value: torch.Tensor, filler: Filler, change: LLMChange) -> None:
        if name.startswith(ORIGINAL_PROJECTOR):
            key = name.removeprefix(ORIGINAL_PROJECTOR)
            if key not in self.projector_keys:
                raise CheckpointError(f"{self.src}: {name} is not a parameter of a {self.connector.type} projector")
            self.put_projector(filler, self.projector_keys[key], value, name)
            return
        for modality, prefix in ORIGINAL_TOWERS.items():
            if name.startswith(prefix):
                self._check_tower(modality, name, vision_key(name.removeprefix(prefix)), value)
                return
        if name.startswith(("model.", "lm_head.")):
            change.add(name, value, name)
            return
        raise CheckpointError(f"{self.src}: unknown tensor {name}")

    def _check_tower(self, modality: str, name: str, key: str, value: torch.Tensor) -> None:
        """A tower tensor saved with the checkpoint must be the supplied tower's: else it is another tower."""
        ours = self.tower_names[modality].get(key)
        supplied = self.resolved[modality].tensors[ours] if ours is not None else None
        # compared in the lower of the two precisions: a release saved in float16 holds the tower rounded
        common = None if supplied is None else min(supplied.dtype, value.dtype, key=lambda d: torch.finfo(d).bits)
        if supplied is None or supplied.shape != value.shape or not torch.equal(supplied.to(common),
                                                                                value.to(common)):
            raise CheckpointError(f"{self.src}: its {modality} tower ({name}) differs from the one given with "
                                  f"--encoder {modality}= ({self.resolved[modality].description})")

    def finish(self, filler: Filler) -> None:
        for modality in MODALITIES:
            for name, value in self.resolved[modality].tensors.items():
                filler.put(f"modalities.{modality}.encoder.{name}", value,
                           f"{self.resolved[modality].description}: {name}")
