"""Export an mmcompose checkpoint as a standalone directory: a stock Hugging Face LLM plus our modality files
(`export_hf`), or, for a model that is a plain LLaVA, a `LlavaForConditionalGeneration` directory that
transformers, vLLM, SGLang and TGI load as it is (`export_llava_hf`).

Layout of `out`:

    config.json, tokenizer files, ...   copied from the base LLM
    model*.safetensors (+ index)        the base weights with the text route's delta folded in: W + D_text
    mmcompose/                          an mmcompose checkpoint whose base is `..` (the exported LLM)

So `AutoModelForCausalLM.from_pretrained(out)` is the model every text token sees (what a text-only
consumer wants), and `load_checkpoint(out / "mmcompose")` is the full multimodal model with no other file.
Because the text delta now lives in `W`, every modality route must apply `D_m - D_text` (the correction
`MultimodalLLM.fold_text_route` applies at run time from the two deltas, here written out as one): LoRA minus
LoRA stays low-rank (factors concatenated, rank `r_m + r_text`); anything else becomes dense. A modality whose
tokens had no delta of their own gets `-D_text` (delta `minus-text`) to keep seeing the original base. The
exported checkpoint's base is a different LLM from the original's, so it cannot be composed with models of the
original base (the fingerprint check refuses it); compose first, then export.

Weights are streamed file by file and tensor by tensor, keeping the base's file names and index.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, CLIPImageProcessor, CLIPVisionConfig, LlavaConfig, LlavaProcessor
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

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
from mmcompose.model import Component, DeltaSpec, ModalitySpec, ModelSpec, MultimodalLLM
from mmcompose.model.conversation import CHAT, TEMPLATES
from mmcompose.model.routed import TEXT_ROUTE, LoRADelta, difference
from mmcompose.tensorfiles import SafetensorsStream, TensorReader, safetensors_header, weight_files

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
    base, source = _load_source(checkpoint, manifest)
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


# --- llava-hf export --------------------------------------------------------------------------------------------
# (our connector parameter, LlavaMultiModalProjector's), for the two connectors a LLaVA projector can carry exactly.
LLAVA_PROJECTOR = {"mlp2x_gelu": {"0.weight": "linear_1.weight", "0.bias": "linear_1.bias",
                                  "2.weight": "linear_2.weight", "2.bias": "linear_2.bias"},
                   "linear": {"proj.weight": "linear_1.weight", "proj.bias": "linear_1.bias"}}
LLAVA_PROCESSORS = ("image", "clip-image")
IMAGE_TOKEN = "<image>"
# The LLM in the hub layout of `LlavaForConditionalGeneration` (what vLLM, SGLang, TGI and every transformers
# version read; transformers 5 renames it on load).
LLAVA_LLM_PREFIXES = (("model.", "language_model.model."), ("lm_head.", "language_model.lm_head."))


def llava_refusal(spec: ModelSpec) -> str | None:
    """Why a model cannot be written as a `LlavaForConditionalGeneration`, or None when it can: one CLIP-vision
    image modality with an `mlp2x_gelu` or `linear` connector, no boundary tokens, and one LLM change on every
    token (foldable into `W`)."""
    if len(spec.modalities) != 1:
        names = ", ".join(m.name for m in spec.modalities) or "none"
        return (f"it has {len(spec.modalities)} modalities ({names}); LlavaForConditionalGeneration takes exactly one "
                f"image input (a second modality has nowhere to go)")
    modality = spec.modalities[0]
    if modality.encoder.type != "clip-vision":
        return f"encoder {modality.encoder.type!r}: a LLaVA's vision tower is a CLIPVisionModel (clip-vision)"
    if modality.connector.type not in LLAVA_PROJECTOR:
        return (f"connector {modality.connector.type!r}: a LLaVA's projector is mlp2x_gelu or (as linear_1 with an "
                f"identity linear_2) linear")
    if modality.num_prefix_tokens or modality.num_suffix_tokens:
        return (f"{modality.name} has boundary tokens ({modality.num_prefix_tokens} prefix, "
                f"{modality.num_suffix_tokens} suffix); a LLaVA places only the projected features")
    if modality.processor.type not in LLAVA_PROCESSORS:
        return f"processor {modality.processor.type!r}: a LLaVA's CLIPImageProcessor reproduces image or clip-image"
    if not isinstance(modality.encoder.options.get("feature_layer", -2), int):
        return "the encoder selects several feature layers"
    serving = {route: next((d.name for d in spec.deltas if route in d.routes), None)
               for route in ("text", modality.name)}
    if len(set(serving.values())) != 1:
        return (f"per-token routed deltas (text: {serving['text'] or 'base'}, {modality.name}: "
                f"{serving[modality.name] or 'base'}); a LLaVA applies one set of LLM weights to every token")
    return None


def export_llava_hf(checkpoint: Path, out: Path, overwrite: bool = False) -> tuple[Path, list[str]]:
    """Write `out` as a `LlavaForConditionalGeneration` directory (config, safetensors with an index, tokenizer with
    `<image>` added, processor with its chat template); returns it and notes on what changed on the way.

    The LLM is the base with the model's one delta folded into `W` (float32 add, then the base's dtype). The
    vocabulary gains one row for `<image>` (id = the base vocabulary size): its embedding row is never read
    (features replace it) and its lm_head row is the mean of the others, as transformers' `resize_token_embeddings`
    initialises new rows, so its logit is the mean logit and never the argmax. A `linear` connector becomes
    `linear_1` with an identity `linear_2` and `projector_hidden_act: linear`, the same map. Refused in one line,
    before anything is written, when `llava_refusal` names a part a LLaVA cannot carry."""
    checkpoint, out = Path(checkpoint), Path(out)
    manifest = read_manifest(checkpoint)
    reason = llava_refusal(manifest.model)
    if reason is not None:
        raise CheckpointError(f"{checkpoint}: cannot be exported as a llava-hf LLaVA: {reason}")
    base, model = _load_source(checkpoint, manifest)
    modality = manifest.model.modalities[0]
    delta = next((d.name for d in manifest.model.deltas if "text" in d.routes), None)
    llm_config = model.llm.config.to_dict()
    vocab = int(llm_config["vocab_size"])
    tokenizer = AutoTokenizer.from_pretrained(base, local_files_only=True)
    if len(tokenizer) != vocab:
        raise CheckpointError(f"{base}: its tokenizer has {len(tokenizer)} tokens but the LLM's vocabulary is {vocab}; "
                              f"the {IMAGE_TOKEN} row would not match its token id")
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    notes = _llava_processor_notes(modality.processor)
    encoder = modality.encoder.options
    vision = CLIPVisionConfig(**encoder["config"]).to_dict()
    config = LlavaConfig(vision_config=vision, text_config={**llm_config, "vocab_size": vocab + 1},
                         image_token_id=vocab, vision_feature_layer=encoder.get("feature_layer", -2),
                         vision_feature_select_strategy="default" if encoder.get("drop_cls", True) else "full",
                         projector_hidden_act="gelu" if modality.connector.type == "mlp2x_gelu" else "linear",
                         image_seq_length=(vision["image_size"] // vision["patch_size"]) ** 2
                         + (0 if encoder.get("drop_cls", True) else 1),
                         tie_word_embeddings=bool(llm_config.get("tie_word_embeddings")))
    branch = _llava_branch(model, modality)
    with atomic_directory(out, overwrite=overwrite) as temporary:
        files = weight_files(base)
        names = [f"model-{index + 1:05d}-of-{len(files) + 1:05d}.safetensors" for index in range(len(files) + 1)]
        weight_map: dict[str, str] = {}
        for file, name in zip(files, names, strict=False):
            weight_map.update(_llava_llm_file(file, temporary / name, model, delta, vocab))
        with SafetensorsStream(temporary / names[-1], {k: (v.dtype, tuple(v.shape)) for k, v in branch.items()}) \
                as stream:
            for key, value in branch.items():
                stream.write(key, value)
                weight_map[key] = names[-1]
        total = sum(value.numel() * value.element_size() for value in branch.values())
        total += sum(_bytes(temporary / name) for name in names[:-1])
        (temporary / SAFETENSORS_INDEX).write_text(json.dumps({"metadata": {"total_size": total},
                                                                "weight_map": dict(sorted(weight_map.items()))}))
        config.save_pretrained(temporary)
        processor = LlavaProcessor(image_processor=_clip_image_processor(modality.processor, vision["image_size"]),
                                   tokenizer=tokenizer, patch_size=vision["patch_size"],
                                   vision_feature_select_strategy=config.vision_feature_select_strategy,
                                   chat_template=llava_chat_template(manifest.model, _adds_bos(tokenizer)),
                                   image_token=IMAGE_TOKEN,
                                   num_additional_image_tokens=1)
        processor.save_pretrained(temporary)
    return out, notes


def _bytes(file: Path) -> int:
    return file.stat().st_size - safetensors_header(file)[1]


def _llava_llm_file(file: Path, target: Path, model: MultimodalLLM, delta: str | None, vocab: int) -> dict[str, str]:
    """One base weight file renamed to the hub LLaVA layout, the delta folded in and the vocabulary tables grown by
    the `<image>` row; returns `{name: target file name}`."""
    folded = {f"{path}.weight": layer.deltas[delta] for path, layer in model.routed.items()} if delta else {}
    with TensorReader([file]) as reader:
        layout = {}
        for name, (dtype, shape) in reader.layout.items():
            grown = shape[0] == vocab and name.endswith(("embed_tokens.weight", "lm_head.weight"))
            layout[_llava_llm_name(name)] = (dtype, (vocab + 1, *shape[1:]) if grown else shape)
        with SafetensorsStream(target, layout) as stream:
            for name in reader.layout:
                value = reader.get(name)
                if name in folded:
                    value = (value.float() + folded[name].matrix().float()).to(value.dtype)
                if layout[_llava_llm_name(name)][1] != tuple(value.shape):
                    value = torch.cat([value, value.float().mean(0, keepdim=True).to(value.dtype)])
                stream.write(_llava_llm_name(name), value)
    return {name: target.name for name in layout}


def _llava_llm_name(name: str) -> str:
    for ours, theirs in LLAVA_LLM_PREFIXES:
        if name.startswith(ours):
            return theirs + name.removeprefix(ours)
    raise CheckpointError(f"base LLM tensor {name} is outside model.* and lm_head.*")


def _llava_branch(model: MultimodalLLM, modality: ModalitySpec) -> dict[str, torch.Tensor]:
    """The vision tower (`vision_tower.vision_model.*`, the hub layout) and the projector, as LLaVA names them."""
    branch = model.branches[modality.name]
    tensors = {f"vision_tower.vision_model.{name.removeprefix('model.').removeprefix('vision_model.')}":
               value.detach().contiguous() for name, value in branch.encoder.state_dict().items()
               if not name.endswith("position_ids")}
    connector = branch.connector.state_dict()
    for ours, theirs in LLAVA_PROJECTOR[modality.connector.type].items():
        tensors[f"multi_modal_projector.{theirs}"] = connector[ours].detach().contiguous()
    if modality.connector.type == "linear":
        hidden = connector["proj.weight"].shape[0]
        tensors["multi_modal_projector.linear_2.weight"] = torch.eye(hidden, dtype=connector["proj.weight"].dtype)
        tensors["multi_modal_projector.linear_2.bias"] = torch.zeros(hidden, dtype=connector["proj.bias"].dtype)
    return tensors


def _clip_image_processor(processor: Component, image_size: int) -> CLIPImageProcessor:
    """The CLIPImageProcessor that does what our `image` (square resize) or `clip-image` (short side + centre crop)
    processor does."""
    options = processor.options
    if processor.type == "image":
        size = int(options.get("size", image_size))
        return CLIPImageProcessor(size={"height": size, "width": size}, do_center_crop=False,
                                  image_mean=list(options.get("mean", OPENAI_CLIP_MEAN)),
                                  image_std=list(options.get("std", OPENAI_CLIP_STD)))
    size = int(options.get("size", image_size))
    crop = int(options.get("crop_size") or size)
    return CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": crop, "width": crop},
                              image_mean=list(options.get("image_mean", OPENAI_CLIP_MEAN)),
                              image_std=list(options.get("image_std", OPENAI_CLIP_STD)))


def _llava_processor_notes(processor: Component) -> list[str]:
    if processor.type == "clip-image" and processor.options.get("pad_to_square"):
        return ["pad_to_square is not carried: CLIPImageProcessor has no padding step (llava-hf's own LLaVA-1.5 "
                "processor does not pad either), so non-square images are centre-cropped instead of padded"]
    return []


def _adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer itself starts a text with BOS (LLaMA's does; a tokenizer without a post-processor
    does not). Our sequences always start with exactly one BOS, so the chat template writes it when the tokenizer
    will not."""
    bos = tokenizer.bos_token_id
    return bos is None or tokenizer("a").input_ids[:1] == [bos]


def llava_chat_template(spec: ModelSpec, tokenizer_adds_bos: bool = True) -> str:
    """A Jinja chat template that renders conversations as this model's template does: each image as
    `<image>\\n` before the user's text (LLaVA's placement), `USER: ... ASSISTANT:` turns, and the BOS token
    when the tokenizer does not add it itself."""
    if spec.template == CHAT:
        return spec.chat_template or ""
    if spec.template not in TEMPLATES:
        raise CheckpointError(f"template {spec.template!r} (stage-1 captions) has no chat layout to export")
    style = TEMPLATES[spec.template]
    bos = "" if tokenizer_adds_bos else "{{ bos_token }}"
    separator = json.dumps(style.turn_separator)
    text = ("{% if message['content'] is string %}{{ message['content'] }}{% else %}"
            "{% for part in message['content'] if part['type'] == 'image' %}{{ '<image>\\n' }}{% endfor %}"
            "{% for part in message['content'] if part['type'] == 'text' %}{{ part['text'] }}{% endfor %}"
            "{% endif %}")
    return (f"{bos}{{{{ {json.dumps(style.system)} }}}}{{% for message in messages %}}"
            f"{{% if message['role'] == 'user' %}}{{{{ {json.dumps(style.user)} }}}}{text}"
            f"{{{{ {json.dumps(style.assistant)} }}}}"
            f"{{% elif message['role'] == 'assistant' %}}{{{{ ' ' }}}}{text}{{{{ {separator} }}}}"
            f"{{% endif %}}{{% endfor %}}")


def _load_source(checkpoint: Path, manifest: Manifest) -> tuple[Path, MultimodalLLM]:
    """The checkpoint's base LLM directory (present, fingerprint checked) and the model with its tensors loaded."""
    base = resolve_base(checkpoint, manifest)
    if not base.is_dir():
        raise CheckpointError(f"{checkpoint}: base LLM not found at {base}")
    if fingerprint_base(base) != manifest.base.fingerprint:
        raise CheckpointError(f"{checkpoint}: the base LLM at {base} is not the one this checkpoint was built on")
    model = skeleton(base, manifest.model, manifest.base.fingerprint)
    model.load_checkpoint_tensors(read_tensors(checkpoint_files(checkpoint, manifest.files)))
    return base, model
