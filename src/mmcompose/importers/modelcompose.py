"""Import an official ModelCompose checkpoint (THUNLP-MT, ACL 2024) as an mmcompose checkpoint.

The official layout is a directory with `config.json` (the LLaMA config plus the multimodal fields) and
`adapter_model.bin` (a pickled state dict, only ever read with `weights_only=True`; `adapter_model.safetensors`
is accepted too). Its keys, and what they become here:

    model.layers.{i}.{self_attn|mlp}.{proj}.lora_{A|B}.{adapter}.weight  -> deltas.<delta>.<path>.lora_{A|B}
    model.modal_projectors.{modality}.{0|2}.{weight|bias}   (mlp2x_gelu)  -> modalities.<m>.connector.{0|2}.*
    model.modal_projectors.{modality}.{weight|bias}         (linear)      -> modalities.<m>.connector.proj.*
    prefix_tokens.{modality} / suffix_tokens.{modality}     (1, n, hidden) -> modalities.<m>.prefix / suffix

Adapter `default` is the language adapter and `vision` is our modality `image`. The official code applies
`default` to every token outside a modality span (generated tokens included) and, under `modal+language`
or `modal`, the modality's own adapter to its span (prefix tokens, features, suffix tokens); under `same`
only `default` exists and serves every token. That is exactly our routing, so the deltas copy over unchanged:
`same` -> one `shared` delta; `modal+language` -> `language` (text) plus one delta per modality; `modal`
-> one delta per modality and none on text (its `default` adapter is never trained, so never saved).

The official prefix/suffix dictionaries also hold an entry for `default`, which no forward pass reads: it
is accepted and dropped (recorded in the provenance). Every other key must be consumed.

The audio connector of the release, `qformer_<N>N_<L>L` (a BERT Q-Former), becomes our `qformer` connector:

    model.modal_projectors.audio.audio_query_tokens / audio_position_embedding.* / audio_llama_proj.*
    model.modal_projectors.audio.audio_Qformer.bert.{embeddings.LayerNorm|encoder.layer.{i}}.*
        -> modalities.audio.connector.{query_tokens|position_embedding|proj|query_norm|layers.{i}}.*

(its unused `position_ids` buffer is dropped). The frozen encoders (CLIP ViT-L/336, BEATs, LanguageBind video,
Point-BERT) are not in the adapter file, so the user supplies them: a CLIP directory, a BEATs `.pt` (or a
directory with config.json + weights.safetensors), a `LanguageBind_Video_merge` directory, a Point-BERT state
dict, an mmcompose checkpoint with that modality, or a component JSON file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mmcompose.checkpoint import fingerprint_base
from mmcompose.errors import CheckpointError
from mmcompose.files import read_json
from mmcompose.importers._common import (
    Filler,
    SourceKeys,
    base_config,
    check_same_llm,
    skeleton,
)
from mmcompose.importers.encoders import EncoderSource, ResolvedEncoder, resolve_encoder
from mmcompose.modalities.qformer import OFFICIAL_TYPE, official_qformer_options, rename_official
from mmcompose.model import Component, DeltaSpec, ModelSpec, modality_spec
from mmcompose.model.routed import DEFAULT_TARGET_MODULES
from mmcompose.tensorfiles import load_state_dict


@dataclass(frozen=True)
class OfficialModality:
    """Where the official config keeps one modality's settings."""

    official: str
    ours: str
    encoder_key: str
    projector_key: str
    hidden_key: str
    select_layer_key: str | None = None
    select_feature_key: str | None = None


OFFICIAL_MODALITIES = (
    OfficialModality("vision", "image", "mm_vision_tower", "mm_projector_type", "mm_hidden_size",
                     "mm_vision_select_layer", "mm_vision_select_feature"),
    OfficialModality("audio", "audio", "mm_audio_encoder", "mm_audio_projector_type", "mm_audio_hidden_size"),
    OfficialModality("video", "video", "mm_video_encoder", "mm_video_projector_type", "mm_video_hidden_size",
                     "mm_video_select_layer", "mm_video_select_feature"),
    OfficialModality("point", "point", "mm_point_encoder", "mm_point_projector_type", "mm_point_hidden_size"),
)

# Connector types we reproduce exactly: official parameter name -> ours.
CONNECTOR_KEYS = {
    "linear": {"weight": "proj.weight", "bias": "proj.bias"},
    "mlp2x_gelu": {name: name for name in ("0.weight", "0.bias", "2.weight", "2.bias")},
}

# Training-time or composition-time options whose parameters or behaviour we do not reproduce.
UNSUPPORTED_FLAGS = ("layer_local_tokens", "seperate_layernorm", "merge_default_weights", "reset_scaling_weights")


def _adapters(src: Path, strategy: str, modalities: list[OfficialModality]
              ) -> tuple[str, dict[str, tuple[str, list[str]]]]:
    """Our strategy and `{official adapter: (our delta name, routes)}` for an official `lora_strategy`."""
    ours = [m.ours for m in modalities]
    if strategy == "same":
        return "shared", {"default": ("shared", ["text", *ours])}
    per_modality = {m.official: (m.ours, [m.ours]) for m in modalities}
    if strategy == "modal+language":
        return "decoupled", {"default": ("language", ["text"]), **per_modality}
    if strategy == "modal":
        return "decoupled", per_modality
    raise CheckpointError(f"{src}: lora_strategy {strategy!r} is not supported "
                          f"(expected 'same', 'modal+language' or 'modal')")


def import_modelcompose(src: Path, out: Path, *, base: Path, encoders: dict[str, EncoderSource] | None = None,
                        overwrite: bool = False) -> Path:
    """Convert the official checkpoint in `src` into an mmcompose checkpoint in `out` on the base LLM `base`.

    `encoders` maps each of our modality names (`image`, `audio`, `video`, `point`) to its encoder: a local
    CLIP directory (built as `clip-vision` with the checkpoint's select layer and feature), a BEATs checkpoint
    (`.pt`, or a directory with config.json + weights.safetensors), a LanguageBind video directory (built at the
    checkpoint's `mm_video_select_layer`, default -2), an mmcompose
    checkpoint that has that modality (its encoder, processor and weights are reused), a JSON file with a
    `{"type", "options"}` component, or a `Component` (whose registered factory provides the weights).
    """
    src, out, base = Path(src), Path(out), Path(base)
    config = read_json(src / "config.json")
    for flag in UNSUPPORTED_FLAGS:
        if config.get(flag):
            raise CheckpointError(f"{src}: {flag}={config[flag]!r} is not supported by this importer")
    present = [m for m in OFFICIAL_MODALITIES
               if config.get(m.encoder_key) or (m.official == "vision" and config.get("mm_vision_encoder"))]
    if not present:
        raise CheckpointError(f"{src}: config.json names no modality encoder "
                              f"({', '.join(m.encoder_key for m in OFFICIAL_MODALITIES)})")
    for m in present:
        if not isinstance(config.get(m.hidden_key), int):
            raise CheckpointError(f"{src}: config.json has {m.encoder_key} but no integer {m.hidden_key}")
    strategy, adapters = _adapters(src, config.get("lora_strategy"), present)
    keys = SourceKeys(load_state_dict(_adapter_file(src)), str(src), strip_prefix="base_model.model.")
    connectors = {m.ours: _connector(src, config, m, keys) for m in present}
    connector_keys = {m.ours: _connector_keys(connectors[m.ours], m, keys) for m in present}
    llm_config = base_config(base)
    check_same_llm({**config, "model_type": "llama"}, llm_config, str(src))  # "multimodal" is a LLaMA subclass
    resolved = _resolve_encoders(src, config, present, encoders or {})

    prefix_total, suffix_total = config.get("local_prefix_tokens", 0), config.get("local_suffix_tokens", 0)
    boundary = {m.ours: (_boundary(config, m, "prefix", prefix_total), _boundary(config, m, "suffix", suffix_total))
                for m in present}
    rank, alpha = int(config.get("lora_r", 128)), float(config.get("lora_alpha", 256))
    spec = ModelSpec(
        modalities=[modality_spec(m.ours, encoder=resolved[m.ours].component, processor=resolved[m.ours].processor,
                                  connector=connectors[m.ours],
                                  num_prefix_tokens=boundary[m.ours][0], num_suffix_tokens=boundary[m.ours][1])
                    for m in present],
        deltas=[DeltaSpec(name=name, kind="lora", routes=routes, rank=rank, alpha=alpha,
                          source={"format": "modelcompose", "adapter": adapter})
                for adapter, (name, routes) in adapters.items()],
        target_modules=list(DEFAULT_TARGET_MODULES), template="vicuna_v1", strategy=strategy,
    )
    model = skeleton(base, spec, fingerprint_base(base))
    filler = Filler(model, str(src))
    hidden = llm_config["hidden_size"]
    planned: dict[str, str] = {}  # our tensor name -> official key
    for m in present:
        width = model.branches[m.ours].encoder.output_dim
        if width != config[m.hidden_key]:
            raise CheckpointError(f"{src}: the {m.ours} encoder given outputs width {width}, but the checkpoint's "
                                  f"{m.hidden_key} is {config[m.hidden_key]}")
        encoder = resolved[m.ours]
        if encoder.tensors is None:
            filler.keep(f"modalities.{m.ours}.encoder.")
        else:
            for name, value in encoder.tensors.items():
                filler.put(f"modalities.{m.ours}.encoder.{name}", value, f"{encoder.description}: {name}")
        for official, name in connector_keys[m.ours].items():
            planned[f"modalities.{m.ours}.connector.{name}"] = f"model.modal_projectors.{m.official}.{official}"
    for adapter, (name, _) in adapters.items():
        for path in model.routed:
            for factor in ("lora_A", "lora_B"):
                planned[f"deltas.{name}.{path}.{factor}"] = f"{path}.{factor}.{adapter}.weight"
    found = {name: (key, keys.take(key)) for name, key in planned.items()}
    for m in present:
        for kind, count in zip(("prefix", "suffix"), boundary[m.ours], strict=True):
            key = f"{kind}_tokens.{m.official}"
            value = _boundary_tokens(keys, key, count, hidden, src)
            if value is not None:
                found[f"modalities.{m.ours}.{kind}"] = (key, value)
    ignored = [name for name in ("prefix_tokens.default", "suffix_tokens.default")
               if keys.take_optional(name) is not None]
    keys.finish()
    for name, (key, value) in found.items():
        filler.put(name, value, key)
    provenance = {
        "imported_from": "modelcompose", "source": str(src.resolve()), "lora_strategy": config["lora_strategy"],
        "encoders": {name: encoder.description for name, encoder in resolved.items()},
        "ignored": ignored,
        "notes": [f"dropped {', '.join(ignored)}: the official model keeps boundary tokens for 'default' "
                  f"but never uses them"] if ignored else [],
    }
    return filler.save(out, overwrite=overwrite, provenance=provenance)


def _adapter_file(src: Path) -> Path:
    for name in ("adapter_model.safetensors", "adapter_model.bin"):
        if (src / name).is_file():
            return src / name
    raise CheckpointError(f"{src}: no adapter_model.bin or adapter_model.safetensors")


def _connector(src: Path, config: dict[str, Any], modality: OfficialModality, keys: SourceKeys) -> Component:
    """Our connector for the official projector, or a clear refusal when none is equivalent."""
    kind = str(config.get(modality.projector_key, "linear"))
    if "VideoLLaMA" in str(config.get(modality.encoder_key)):
        raise CheckpointError(f"{src / 'config.json'}: {modality.encoder_key}: Video-LLaMA's audio encoder and "
                              f"projector are not supported (the released audio model uses BEATs + qformer_32N_2L)")
    if OFFICIAL_TYPE.fullmatch(kind):
        prefix = f"model.modal_projectors.{modality.official}."
        weights = {name[len(prefix):]: keys.pending[name] for name in keys.matching(prefix)}
        return Component(type="qformer", options=official_qformer_options(kind, weights, str(src)))
    if kind not in CONNECTOR_KEYS:
        raise CheckpointError(f"{src / 'config.json'}: {modality.projector_key}: unknown projector type {kind!r} "
                              f"(importable: {', '.join(CONNECTOR_KEYS)}, qformer_<N>N_<L>L)")
    return Component(type=kind)


def _connector_keys(connector: Component, modality: OfficialModality, keys: SourceKeys) -> dict[str, str]:
    """Official projector parameter name (after `model.modal_projectors.<m>.`) -> our connector parameter name."""
    if connector.type != "qformer":
        return CONNECTOR_KEYS[connector.type]
    prefix = f"model.modal_projectors.{modality.official}."
    mapping = {}
    for key in keys.matching(prefix):
        name = key[len(prefix):]
        try:
            ours = rename_official(name)
        except KeyError:
            continue  # left pending: reported as unexpected by SourceKeys.finish
        if ours is None:
            keys.take(key)
        else:
            mapping[name] = ours
    return mapping


def _boundary(config: dict[str, Any], modality: OfficialModality, kind: str, total: int) -> int:
    """The official count: none at all when the global count is 0, else the per-modality override or the global."""
    if not total:
        return 0
    own = config.get(f"local_{modality.official}_{kind}_tokens")
    return int(own if own is not None else total)


def _boundary_tokens(keys: SourceKeys, name: str, count: int, hidden: int, src: Path) -> torch.Tensor | None:
    """Official `(1, n, hidden)` boundary tokens -> our `(n, hidden)`; an empty official entry is dropped."""
    if count == 0:
        keys.take_optional(name)
        return None
    value = keys.take(name)
    if value.numel() and tuple(value.shape) != (1, count, hidden):
        raise CheckpointError(f"{src}: {name} has shape {tuple(value.shape)}, expected {(1, count, hidden)}")
    return value.reshape(count, hidden) if value.numel() else value


def _resolve_encoders(src: Path, config: dict[str, Any], present: list[OfficialModality],
                      given: dict[str, EncoderSource]) -> dict[str, ResolvedEncoder]:
    wanted = {m.ours for m in present}
    extra = sorted(set(given) - wanted)
    if extra:
        raise CheckpointError(f"{src}: encoders given for {', '.join(extra)}, which the checkpoint does not have "
                              f"(it has: {', '.join(sorted(wanted))})")
    missing = [m for m in present if m.ours not in given]
    if missing:
        needed = "; ".join(f"{m.ours} ({m.encoder_key}={config.get(m.encoder_key) or config.get('mm_vision_encoder')}, "
                           f"width {config.get(m.hidden_key)})" for m in missing)
        raise CheckpointError(f"{src}: the official checkpoint does not contain its frozen encoders; supply: {needed} "
                              f"as a local CLIP directory, an mmcompose checkpoint with that modality, or a component "
                              f"JSON file (CLI: --encoder {missing[0].ours}=PATH)")
    return {m.ours: _encoder(m, given[m.ours], config) for m in present}


def _encoder(modality: OfficialModality, source: EncoderSource, config: dict[str, Any]) -> ResolvedEncoder:
    """The shared resolver, with CLIP features selected as the checkpoint's config says."""
    layer = int(config.get(modality.select_layer_key, -1)) if modality.select_layer_key else -1
    feature = config.get(modality.select_feature_key, "patch") if modality.select_feature_key else "patch"
    return resolve_encoder(modality.ours, source, clip_layer=layer, clip_feature=feature)


__all__ = ["EncoderSource", "import_modelcompose"]
