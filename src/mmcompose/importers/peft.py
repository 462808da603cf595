"""Import a PEFT LoRA adapter (`adapter_config.json` + `adapter_model.safetensors`) as the LLM delta of a
modality model.

The branch (encoder, connector, boundary tokens) comes from an existing mmcompose checkpoint, or is the
modality's registered default (untrained) when none is given. `route` says which tokens the adapter serves:
`shared` (every token, as PEFT applies it), `language` (text tokens only) or `modality` (the modality's own
tokens only). The checkpoint's own deltas for the routes the adapter does not claim are kept, so that two
adapters can be imported one after the other into one decoupled (DAMC) model.

PEFT's per-module `rank_pattern`/`alpha_pattern` (matched with PEFT's own rule) and rsLoRA are supported
exactly: when the modules end up with different ranks or scalings, every module is padded to the largest
rank with zero factors and its scaling is folded into `B` (the product is unchanged). Our target linears are
the union of the adapter's and the kept deltas'; a delta has zero factors where it has no weights, which is
also what PEFT computes there.

`adapter_config.json` is parsed by PEFT's `LoraConfig` (its own checks apply), and any option whose effect a LoRA
product on target linears cannot carry (DoRA, trained biases, `modules_to_save`, ...) is refused in one line.
"""

from __future__ import annotations

import math
import re
from dataclasses import fields
from pathlib import Path
from typing import Any, Literal, NamedTuple

import peft
import torch
from peft import LoraConfig
from peft.utils.other import get_pattern_key

from mmcompose.checkpoint import checkpoint_files, fingerprint_base, read_manifest, read_tensors
from mmcompose.errors import CheckpointError
from mmcompose.files import read_json
from mmcompose.importers._common import Filler, preview, skeleton
from mmcompose.model import DeltaSpec, ModalitySpec, ModelSpec, modality_spec
from mmcompose.model.routed import DEFAULT_TARGET_MODULES
from mmcompose.tensorfiles import load_state_dict

Route = Literal["shared", "language", "modality"]

LORA_KEY = re.compile(r"base_model\.model\.(?P<path>.+)\.lora_(?P<factor>A|B)(?:\.[^.]+)?\.weight")

# LoraConfig fields whose non-default values a LoRA product on target linears carries exactly: metadata, training-only
# settings (dropout, initialisation that leaves the base weights alone), and the ones that say which modules have
# which rank and scaling (the weights file shows which modules were adapted). Any other field set away from PEFT's
# default is refused, so an option added in a later PEFT is refused until someone checks what it computes.
CARRIED_OPTIONS = frozenset({
    "task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision", "inference_mode",
    "r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "target_modules", "exclude_modules",
    "layers_to_transform", "layers_pattern", "lora_dropout", "init_lora_weights", "loftq_config", "eva_config",
    "corda_config", "lora_ga_config", "runtime_config", "ensure_weight_tying", "megatron_core",
})
# Initialisations that change the base weights as well, so the adapter is relative to another base.
BASE_CHANGING_INITS = ("pissa", "olora", "loftq", "corda")
# Why the commonest refused options cannot be carried (any other gets a generic reason).
REASONS = {
    "use_dora": "DoRA adds a magnitude vector",
    "bias": "trained biases",
    "lora_bias": "lora_bias trains biases",
    "modules_to_save": "modules_to_save trains whole modules",
    "trainable_token_indices": "trainable tokens change the embedding table",
    "fan_in_fan_out": "fan_in_fan_out (Conv1D weights) is not a LLaMA-family layout",
    "layer_replication": "layer_replication changes the architecture",
}


def import_peft(adapter_dir: Path, out: Path, *, base: Path, modality: str, from_checkpoint: Path | None = None,
                route: Route = "shared", overwrite: bool = False) -> Path:
    """Make the PEFT adapter in `adapter_dir` the LLM delta of a `modality` model on `base`, saved in `out`."""
    adapter_dir, out, base = Path(adapter_dir), Path(out), Path(base)
    if route not in ("shared", "language", "modality"):
        raise CheckpointError(f"unknown route {route!r} (expected shared, language or modality)")
    config = parse_lora_config(adapter_dir)
    factors = read_lora_factors(adapter_dir)
    rank, alpha, factors, uniform = uniform_lora(config, factors, adapter_dir)
    fingerprint = fingerprint_base(base)
    routes = {"shared": ["text", modality], "language": ["text"], "modality": [modality]}[route]
    name = {"shared": "shared", "language": "language", "modality": modality}[route]

    start = _start(from_checkpoint, modality, fingerprint, routes)
    kept, source = start.kept, start.tensors
    if name in {delta.name for delta in kept}:
        raise CheckpointError(f"{from_checkpoint}: already has a delta named {name!r} serving other routes")
    names = {path.rpartition(".")[2] for path in factors} | (set(start.target_modules) if kept else set())
    targets = [m for m in DEFAULT_TARGET_MODULES if m in names] + sorted(names - set(DEFAULT_TARGET_MODULES))
    delta = DeltaSpec(name=name, kind="lora", routes=routes, rank=rank, alpha=alpha,
                      source={"format": "peft", "base_model_name_or_path": config.base_model_name_or_path})
    spec = ModelSpec(modalities=[start.branch], deltas=[*kept, delta], target_modules=targets, template=start.template,
                     chat_template=start.chat_template,
                     strategy="shared" if route == "shared" else "decoupled")
    model = skeleton(base, spec, fingerprint)
    foreign = sorted(set(factors) - set(model.routed))
    if foreign:
        raise CheckpointError(f"{adapter_dir}: the adapter targets {preview(foreign)}, which the base LLM does not "
                              f"have as linear layers")

    filler = Filler(model, str(adapter_dir))
    if source is None:
        filler.keep(f"modalities.{modality}.")
    zero_filled: dict[str, int] = {}
    for path in model.routed:
        for kept_delta in kept:
            for part in ("lora_A", "lora_B") if kept_delta.kind == "lora" else ("weight",):
                key = f"deltas.{kept_delta.name}.{path}.{part}"
                if key in source:
                    filler.put(key, source[key])
                else:
                    filler.put(key, torch.zeros_like(filler.targets[key]))
                    zero_filled[kept_delta.name] = zero_filled.get(kept_delta.name, 0) + 1
        lora_a, lora_b = factors.get(path, (None, None))
        for part, value in (("lora_A", lora_a), ("lora_B", lora_b)):
            key = f"deltas.{name}.{path}.{part}"
            filler.put(key, torch.zeros_like(filler.targets[key]) if value is None else value,
                       f"{path}.{part} of {adapter_dir}")
        if lora_a is None:
            zero_filled[name] = zero_filled.get(name, 0) + 1
    if source is not None:
        for key, value in source.items():
            if key.startswith(f"modalities.{modality}."):
                filler.put(key, value)
    notes = [f"delta {delta_name!r} has zero factors on {count} linear(s) it does not adapt"
             for delta_name, count in zero_filled.items()]
    if not uniform:
        notes.append(f"per-module ranks/scalings unified: padded to rank {rank}, scaling folded into lora_B")
    if source is None:
        notes.append(f"the {modality} branch is new and untrained (registered defaults)")
    provenance: dict[str, Any] = {"imported_from": "peft", "source": str(adapter_dir.resolve()), "route": route,
                                  "branch_from": str(Path(from_checkpoint).resolve()) if from_checkpoint else None,
                                  "notes": notes}
    return filler.save(out, overwrite=overwrite, provenance=provenance)


def parse_lora_config(adapter_dir: Path) -> LoraConfig:
    """`adapter_config.json` parsed by PEFT's own `LoraConfig`, refused if it asks for more than a LoRA product on
    target linears: a field outside `CARRIED_OPTIONS` away from its default, an option this PEFT does not know (an
    adapter from a later PEFT) that is not off, or an initialisation that changed the base weights."""
    raw = read_json(adapter_dir / "adapter_config.json")
    if not isinstance(raw, dict) or raw.get("peft_type") != "LORA":
        kind = raw.get("peft_type") if isinstance(raw, dict) else None
        raise CheckpointError(f"{adapter_dir}: peft_type {kind!r} is not supported (only LORA)")
    known = {field.name for field in fields(LoraConfig)}
    unknown = sorted(key for key, value in raw.items() if key not in known and value not in (None, False, [], {}))
    if unknown:
        raise CheckpointError(f"{adapter_dir}: adapter_config.json sets {', '.join(unknown)}, unknown to PEFT "
                              f"{peft.__version__} (an adapter from a later PEFT?)")
    try:
        config = LoraConfig.from_peft_type(**{key: value for key, value in raw.items() if key in known})
    except Exception as error:  # PEFT's own checks: ValueError, TypeError, ...
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise CheckpointError(f"{adapter_dir}: adapter_config.json: {first}") from None
    default = LoraConfig()
    for field in fields(LoraConfig):
        value = getattr(config, field.name)
        if field.name not in CARRIED_OPTIONS and value != getattr(default, field.name):
            reason = REASONS.get(field.name, f"{field.name}={value!r} changes what the adapter computes")
            raise CheckpointError(f"{adapter_dir}: {field.name} is not supported: {reason}")
    init = config.init_lora_weights
    if isinstance(init, str) and init.lower().startswith(BASE_CHANGING_INITS):
        raise CheckpointError(f"{adapter_dir}: init_lora_weights={init!r} is not supported: it changes the base "
                              "weights too (convert the adapter to a plain LoRA with PEFT first)")
    for name in ("r", "lora_alpha"):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise CheckpointError(f"{adapter_dir}: adapter_config.json: {name} must be a positive number, "
                                  f"got {value!r}")
    return config


def read_lora_factors(adapter_dir: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """`{module path in the causal LM: (lora_A, lora_B)}`, refusing any key that is not a LoRA factor."""
    file = next((adapter_dir / name for name in ("adapter_model.safetensors", "adapter_model.bin")
                 if (adapter_dir / name).is_file()), None)
    if file is None:
        raise CheckpointError(f"{adapter_dir}: no adapter_model.safetensors")
    found: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, value in load_state_dict(file).items():
        match = LORA_KEY.fullmatch(key)
        if match is None:
            unknown.append(key)
        else:
            found.setdefault(match["path"], {})[match["factor"]] = value
    if unknown:
        raise CheckpointError(f"{file}: {len(unknown)} key(s) that are not LoRA factors of linear layers: "
                              f"{preview(unknown)}")
    incomplete = [path for path, pair in found.items() if len(pair) != 2]
    if incomplete:
        raise CheckpointError(f"{file}: {preview(incomplete)} has lora_A or lora_B but not both")
    return {path: (pair["A"], pair["B"]) for path, pair in found.items()}


def uniform_lora(config: LoraConfig, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], where: Path
               ) -> tuple[int, float, dict[str, tuple[torch.Tensor, torch.Tensor]], bool]:
    """One rank and alpha for all modules: the adapter's own when uniform, else padded with scaling folded in."""
    listed = config.target_modules
    if isinstance(listed, list | set):
        adapted = {path.rpartition(".")[2] for path in factors}
        absent = sorted(set(listed) - adapted)
        if absent:
            raise CheckpointError(f"{where}: adapter_config.json targets {', '.join(absent)} but the weights have no "
                                  f"LoRA for it")
    ranks, alphas = config.rank_pattern or {}, config.alpha_pattern or {}
    scaled: dict[str, tuple[int, float]] = {}
    for path, (lora_a, _) in factors.items():
        rank = ranks.get(get_pattern_key(ranks.keys(), path), config.r)
        alpha = alphas.get(get_pattern_key(alphas.keys(), path), config.lora_alpha)
        if lora_a.shape[0] != rank:
            raise CheckpointError(f"{where}: {path}.lora_A has rank {lora_a.shape[0]}, adapter_config.json says {rank}")
        scaled[path] = (rank, alpha / math.sqrt(rank) if config.use_rslora else alpha / rank)
    if len({rank for rank, _ in scaled.values()}) <= 1 and len({scale for _, scale in scaled.values()}) <= 1:
        rank, scale = next(iter(scaled.values()), (config.r, config.lora_alpha / config.r))
        return rank, scale * rank, factors, True
    top = max(rank for rank, _ in scaled.values())
    padded = {}
    for path, (lora_a, lora_b) in factors.items():
        rank, scale = scaled[path]
        padded[path] = (torch.cat([lora_a, lora_a.new_zeros(top - rank, lora_a.shape[1])]),
                        torch.cat([lora_b * scale, lora_b.new_zeros(lora_b.shape[0], top - rank)], dim=1))
    return top, float(top), padded, False


class _Start(NamedTuple):
    """What the imported model takes from `from_checkpoint`: the branch spec, the deltas the adapter leaves in
    place (restricted to this modality's routes), all its tensors, its template (and chat template text) and its
    target linears."""

    branch: ModalitySpec
    kept: list[DeltaSpec]
    tensors: dict[str, torch.Tensor] | None
    template: str
    chat_template: str | None
    target_modules: list[str]


def _start(checkpoint: Path | None, modality: str, fingerprint: str, routes: list[str]) -> _Start:
    if checkpoint is None:
        return _Start(modality_spec(modality), [], None, "tagged", None, [])
    checkpoint = Path(checkpoint)
    manifest = read_manifest(checkpoint)
    if manifest.base.fingerprint != fingerprint:
        raise CheckpointError(f"{checkpoint}: built on a different base LLM than the one given")
    branch = next((m for m in manifest.model.modalities if m.name == modality), None)
    if branch is None:
        have = ", ".join(m.name for m in manifest.model.modalities) or "none"
        raise CheckpointError(f"{checkpoint}: has no {modality!r} modality (it has: {have})")
    kept = []
    for delta in manifest.model.deltas:
        own = [route for route in delta.routes if route in ("text", modality)]
        if own and not set(own) & set(routes):
            kept.append(delta.model_copy(update={"routes": own}))
    return _Start(branch, kept, read_tensors(checkpoint_files(checkpoint, manifest.files)), manifest.model.template,
                  manifest.model.chat_template, manifest.model.target_modules)
