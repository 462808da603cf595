"""Train modality models: stage 1 aligns a modality's encoder and connector on captions with
the LLM frozen; stage 2 instruction-tunes the LLM deltas (`shared`, `decoupled`, `full`) with the branches.

Runs under `accelerate`: one process, or `accelerate launch` with DDP (gloo on CPU), FSDP2 or DeepSpeed from the
config files in `configs/accelerate/`. Mixed precision is accelerate's autocast over float32 weights;
gradient checkpointing is transformers' own on the decoder layers. Step checkpoints hold the trained tensors,
optimizer and scheduler as safetensors + JSON (nothing pickled), and a resumed run ends with exactly the
weights of an uninterrupted one: batch order is a function of (seed, epoch), each step's RNG is seeded from
(seed, step, rank), and the step count is fixed up front.

The loss of an optimizer step is the mean over every target token of the global batch (all processes, all
accumulated micro-batches), as transformers' Trainer computes it with `num_items_in_batch`: so batch 4, batch
2 x accumulation 2, and 2 processes x batch 2 take the same step (up to float rounding). The official
ModelCompose trainer averages per micro-batch means instead, which weights a token by its batch's size.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
import torch
import yaml
from accelerate import Accelerator, DistributedDataParallelKwargs, FullyShardedDataParallelPlugin, PartialState
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from safetensors.torch import save_file
from torch import nn
from transformers import get_cosine_schedule_with_warmup

from mmcompose.checkpoint import checkpoint_files, read_manifest, read_tensors, save_checkpoint
from mmcompose.data.dataset import DataOptions, SampleDataset, StepBatches, step_loader, training_samples
from mmcompose.data.samples import BadSample, Sample
from mmcompose.errors import CheckpointError, MMComposeError
from mmcompose.files import atomic_directory, atomic_write_text
from mmcompose.importers.encoders import EncoderSource, resolve_encoder
from mmcompose.model.assembly import Example
from mmcompose.model.mllm import MultimodalLLM, modality_spec
from mmcompose.model.routed import LoRADelta
from mmcompose.model.spec import Component, ModalitySpec, Strategy
from mmcompose.train.encoder import caption_classes, pretrain_encoder
from mmcompose.train.progress import progress_bar

CHECKPOINTS, FINAL_MODEL, LOG_FILE, METRICS_FILE = "checkpoints", "model", "log.jsonl", "metrics.json"
STATE_FILE, OPTIMIZER_TENSORS, OPTIMIZER_FILE = "trainer_state.json", "optimizer.safetensors", "optimizer.json"
TRAINED_TENSORS = "trained.safetensors"
BUFFER_NAMES = ("running_mean", "running_var", "num_batches_tracked")
SKIPPED_FILE = "skipped_samples.txt"
KEEP_DECODED_BYTES = 512 * 2**20
"""Decoded inputs a training process keeps when items come back: all of a demo world's media (~30 MB as
tensors) with room to spare, a bounded amount of host memory for real data."""


class LearningRates(BaseModel):
    """Peak learning rate per parameter group; the LLM deltas split by role.

    `deltas` is the rate of every delta that serves modality tokens: a decoupled run's modality deltas, and
    also `shared` and `full`, which serve text and modality tokens alike (ModelCompose's NaiveMC runs train
    their one adapter at the main rate). `language` is the rate of a delta that serves text tokens only (a
    decoupled run's `language` delta); None trains it with the others, in one group, at `deltas`. ModelCompose's
    DAMC runs train the language delta at a tenth of the modality delta's rate (it shares the connector's
    optimizer group there).
    """

    model_config = ConfigDict(extra="forbid")
    encoder: float = Field(1e-3, ge=0)
    connector: float = Field(1e-3, ge=0)
    boundary: float = Field(1e-3, ge=0)
    deltas: float = Field(1e-3, ge=0)
    language: float | None = Field(None, ge=0)


class TrainConfig(BaseModel):
    """One training run. `pretrain` trains the branches (encoder if `train_encoder`, connector, boundary
    tokens) with the LLM and its deltas frozen; `instruct` trains the deltas as well."""

    model_config = ConfigDict(extra="forbid")
    stage: Literal["pretrain", "instruct"]
    train_encoder: bool | None = Field(None, description="train the encoders (None: the ones not loaded from "
                                                         "pretrained weights; those stay frozen, in eval mode)")
    encoder_steps: int = Field(0, ge=0, description="pretrain stage: LLM-free encoder pretraining steps first "
                                                    "(see train.encoder); at lr.encoder")
    lr: LearningRates = Field(default_factory=LearningRates)
    weight_decay: float = Field(0.0, ge=0)
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the LoRA deltas' inputs while training "
                                                             "(ModelCompose: 0.05)")
    batch_size: int = Field(16, gt=0, description="per process and micro-batch")
    grad_accum: int = Field(1, gt=0, description="micro-batches accumulated per optimizer step")
    mixed_precision: Literal["no", "bf16", "fp16"] | None = Field(
        None, description="autocast precision (None: accelerate's launch configuration, else 'no')")
    gradient_checkpointing: bool = False
    steps: int | None = Field(None, gt=0, description="optimizer steps; overrides epochs")
    epochs: int = Field(1, gt=0)
    group_by_length: bool = Field(True, description="batches of similar-length examples (less padding)")
    warmup_ratio: float = Field(0.03, ge=0, le=1)
    grad_clip: float | None = Field(1.0, gt=0)
    seed: int = 0
    save_every: int = Field(0, ge=0, description="step checkpoint every N steps (0: none)")
    keep_last: int = Field(2, gt=0, description="step checkpoints kept")
    log_every: int = Field(10, gt=0)
    data: DataOptions = Field(default_factory=DataOptions)

    @model_validator(mode="after")
    def _encoder_steps_only_in_pretrain(self) -> TrainConfig:
        if self.encoder_steps and self.stage != "pretrain":
            raise ValueError("encoder_steps belongs to the pretrain stage")
        return self

    def identity(self) -> dict[str, Any]:
        """The settings a resumed run must share with the interrupted one (everything but bookkeeping)."""
        return self.model_dump(mode="json", exclude={"save_every": True, "keep_last": True, "log_every": True,
                                                     "gradient_checkpointing": True,
                                                     "data": {"num_workers", "cache_features"}})


def read_yaml_mapping(path: str | Path, what: str) -> dict[str, Any]:
    """A YAML file holding a mapping (a training config, a recipe), with one-line errors naming the file."""
    try:
        loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise MMComposeError(f"{path}: cannot read the {what} ({' '.join(str(error).split())})") from None
    if not isinstance(loaded, dict):
        raise MMComposeError(f"{path}: a {what} is a mapping of its fields")
    return loaded


Schema = TypeVar("Schema", bound=BaseModel)


def validated(schema: type[Schema], values: Any, origin: str | None) -> Schema:
    """`values` as `schema`, the first problem as one line: `origin: field.path: message`."""
    try:
        return schema.model_validate(values)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or schema.__name__
        raise MMComposeError(f"{origin}: {where}: {first['msg']}" if origin else f"{where}: {first['msg']}") from None


def load_config(path: str | Path | None = None, **overrides: Any) -> TrainConfig:
    """A `TrainConfig` from an optional YAML file of its fields, with `overrides` (None values ignored) on top."""
    values = read_yaml_mapping(path, "training config") if path is not None else {}
    values.update({key: value for key, value in overrides.items() if value is not None})
    return validated(TrainConfig, values, str(path or "training config"))


def build_model(base: str | Path, modalities: Sequence[str | ModalitySpec], *, strategy: Strategy,
                rank: int = 16, alpha: float = 32.0, start_from: Sequence[str | Path] = (), seed: int = 0,
                template: str | None = None, encoders: dict[str, EncoderSource] | None = None,
                connector: Component | None = None, boundary_tokens: int | None = None,
                target_modules: Sequence[str] | None = None,
                processor_options: dict[str, dict[str, Any]] | None = None) -> MultimodalLLM:
    """A model to train on `base`: new deltas per `strategy`, modality branches taken from `start_from`.

    Stage 2 starts from stage 1 this way: the modality specs (encoder and connector options) and branch
    tensors come from the stage-1 checkpoints, while the deltas are created fresh (LoRA B = 0, so the
    starting model computes exactly what stage 1 did). Several `start_from` checkpoints can supply different
    modalities, e.g. four single-modality stage-1 models for a joint stage 2. The seed fixes the fresh parts.

    `encoders` maps a modality to an encoder source (see `importers.encoders.resolve_encoder`); encoders read
    from pretrained weights are recorded in the provenance (`frozen_encoders`), so every later stage keeps them
    frozen too. `connector` overrides the registered default of modalities that do not come from `start_from`;
    `boundary_tokens` (prefix and suffix each) applies to every modality, and a `start_from` branch with
    another count gets fresh boundary tokens (ModelCompose's DAMC stage 2 adds 5 + 5 to a stage 1 without).
    `processor_options` (modality -> options) go on top of each modality's processor options, e.g.
    `{"image": {"pad_to_square": True}}` for LLaVA-1.5's `image_aspect_ratio: pad`.
    An encoder whose width does not fit the connector it is paired with is a one-line error here, before any
    step. `template` None keeps the start checkpoints' template, a `chat` one with the chat template text they
    recorded (not the base tokenizer's current one), so every stage formats conversations alike.
    """
    names = [m if isinstance(m, str) else m.name for m in modalities]
    encoders = dict(encoders or {})
    unknown = sorted(set(encoders) - set(names))
    if unknown:
        raise MMComposeError(f"--encoder given for {', '.join(unknown)}, which is not trained here "
                             f"(modalities: {', '.join(names)})")
    sources: dict[str, tuple[ModalitySpec, Path]] = {}
    templates = set()
    frozen: set[str] = set()
    for path in map(Path, start_from):
        manifest = read_manifest(path)
        templates.add((manifest.model.template, manifest.model.chat_template))
        for spec in manifest.model.modalities:
            if spec.name in names and spec.name in sources:
                raise MMComposeError(f"modality {spec.name!r} is in both {sources[spec.name][1]} and {path}")
            sources[spec.name] = (spec, path)
        frozen |= set(manifest.provenance.get("frozen_encoders", [])) & set(names)
    if start_from:
        missing = [name for name in names if name not in sources]
        if missing:
            raise MMComposeError(f"modality {missing[0]!r} is in none of the start checkpoints "
                                 f"({', '.join(map(str, start_from))})")
        if len(templates) > 1:
            named = sorted({name for name, _ in templates})
            raise MMComposeError(f"the start checkpoints use different templates: {', '.join(named)}"
                                 + ("" if len(named) > 1 else " (different chat template texts)"))
    resolved = {name: resolve_encoder(name, source) for name, source in encoders.items()}
    fresh_boundary: set[str] = set()
    specs = []
    for name, given in zip(names, modalities, strict=True):
        if name in sources:
            spec = sources[name][0]
            if boundary_tokens is not None and (spec.num_prefix_tokens, spec.num_suffix_tokens) != (
                    boundary_tokens, boundary_tokens):
                spec = spec.model_copy(update={"num_prefix_tokens": boundary_tokens,
                                               "num_suffix_tokens": boundary_tokens})
                fresh_boundary.add(name)
        elif isinstance(given, ModalitySpec):
            spec = given
        else:
            spec = modality_spec(name, connector=connector, num_prefix_tokens=boundary_tokens,
                                 num_suffix_tokens=boundary_tokens)
        if name in resolved:
            spec = spec.model_copy(update={"encoder": resolved[name].component,
                                           "processor": resolved[name].processor})
            frozen.discard(name)
            if resolved[name].pretrained:
                frozen.add(name)
        if (processor_options or {}).get(name):
            options = {**spec.processor.options, **processor_options[name]}
            spec = spec.model_copy(update={"processor": spec.processor.model_copy(update={"options": options})})
        specs.append(spec)
    recorded, chat_template = templates.pop() if templates else ("tagged", None)
    torch.manual_seed(seed)
    try:
        model = MultimodalLLM.from_base(base, specs, strategy=strategy, rank=rank, alpha=alpha,
                                        template=template or recorded,
                                        chat_template=chat_template if template in (None, recorded) else None,
                                        target_modules=target_modules)
    except (TypeError, ValueError) as error:
        raise MMComposeError(f"cannot build the model: {' '.join(str(error).split())}") from None
    own = model.checkpoint_tensors()
    for name, encoder in resolved.items():
        if encoder.tensors is not None:
            model.branches[name].encoder.load_state_dict(encoder.tensors)
    stages: list[Any] = []
    for path in dict.fromkeys(sources[name][1] for name in names if name in sources):
        manifest = read_manifest(path)
        if manifest.base.fingerprint != model.base_fingerprint:
            raise CheckpointError(f"{path}: trained on a different base LLM than {base}")
        stages += manifest.provenance.get("stages", [])
        wanted = tuple(f"modalities.{name}." for name in names if name in sources and sources[name][1] == path)
        replaced = tuple(f"modalities.{name}.encoder." for name in resolved) + tuple(
            f"modalities.{name}.{end}" for name in fresh_boundary for end in ("prefix", "suffix"))
        with torch.no_grad():
            for key, tensor in read_tensors(checkpoint_files(path, manifest.files)).items():
                if not key.startswith(wanted) or key.startswith(replaced):
                    continue
                if own[key].shape != tensor.shape:
                    encoder = model.branches[key.split(".")[1]].encoder
                    raise MMComposeError(
                        f"{path}: {key} has shape {tuple(tensor.shape)} but {tuple(own[key].shape)} here: the "
                        f"encoder (width {encoder.output_dim}) does not match that checkpoint's connector")
                own[key].copy_(tensor)
    model.provenance = {"stages": stages, "frozen_encoders": sorted(frozen)}
    return model


def trained_encoders(model: MultimodalLLM, config: TrainConfig) -> set[str]:
    """The modalities whose encoder trains: all with `train_encoder`, none without, and by default those not
    loaded from pretrained weights (a pretrained encoder stays frozen, as the official recipe keeps CLIP,
    BEATs, LanguageBind and Point-BERT)."""
    if config.train_encoder is not None:
        return set(model.branches) if config.train_encoder else set()
    return set(model.branches) - set(model.provenance.get("frozen_encoders", []))


def parameter_groups(model: MultimodalLLM, config: TrainConfig) -> list[dict[str, Any]]:
    """Freeze everything, then unfreeze what the stage trains, as AdamW groups with their own learning rate.
    Weight decay applies to weight matrices only, never to boundary tokens, norms or biases."""
    model.requires_grad_(False)
    named: dict[str, list[tuple[str, nn.Parameter]]] = {"encoder": [], "connector": [], "boundary": [], "deltas": []}
    for name, branch in model.branches.items():
        if name in trained_encoders(model, config):
            named["encoder"] += list(branch.encoder.named_parameters())
        named["connector"] += list(branch.connector.named_parameters())
        named["boundary"] += [("boundary", p) for p in (branch.prefix, branch.suffix) if p is not None]
    if config.stage == "instruct":
        language = {d.name for d in model.spec.deltas if d.routes == ["text"]} if config.lr.language is not None \
            else set()
        for layer in model.routed.values():
            for name, delta in layer.deltas.items():
                group = "language" if name in language else "deltas"
                named.setdefault(group, []).extend((f"{name}.{n}", p) for n, p in delta.named_parameters())
    groups = []
    for group, parameters in named.items():
        learning_rate = getattr(config.lr, group)
        for decay in (True, False):
            chosen = [p for n, p in parameters if (p.ndim >= 2 and n != "boundary") == decay]
            if chosen:
                for parameter in chosen:
                    parameter.requires_grad_(True)
                groups.append({"params": chosen, "lr": learning_rate, "name": group,
                               "weight_decay": config.weight_decay if decay else 0.0})
    if not groups:
        raise MMComposeError(f"nothing to train: stage {config.stage!r} on a model with strategy "
                             f"{model.spec.strategy!r} and no modality branches")
    return groups


def describe_groups(groups: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The trained parameter groups by name: peak learning rate and parameter count (weight-decay halves of a
    group together)."""
    described: dict[str, dict[str, Any]] = {}
    for group in groups:
        entry = described.setdefault(group["name"], {"lr": group["lr"], "parameters": 0})
        entry["parameters"] += sum(p.numel() for p in group["params"])
    return described


class _LossModule(nn.Module):
    """Assembly and LLM forward in one module, so DDP sees the branches and deltas used in one forward pass.

    Returns the summed token loss divided by `num_items` (the target tokens of the whole optimizer step) and
    the batch's routes: with gradient checkpointing the decoder layers run again during the backward pass,
    which must therefore happen inside the same routing (see `train`).
    """

    def __init__(self, model: MultimodalLLM, encoded: Sequence[str] = ()) -> None:
        super().__init__()
        self.model, self.encoded = model, tuple(encoded)

    def forward(self, examples: list[Example], num_items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self.model.assemble(examples, padding_side="right", encoded=self.encoded)
        return self.model(batch, use_cache=False, num_items_in_batch=num_items).loss, batch.routes


def target_tokens(model: MultimodalLLM, examples: Sequence[Example]) -> int:
    """The positions that carry a label in these examples, as the assembler lays them out: every answer's
    tokens plus the end-of-sequence token."""
    return model.assembler.labelled_tokens(examples)


def _accelerator(find_unused: bool, config: TrainConfig) -> Accelerator:
    """The run's `Accelerator`. `find_unused` tells DDP that a step may leave parameters unused: in joint
    training or with text-only samples, a batch without some modality never reaches its branch or delta.

    Without CUDA, a multi-process launch (`accelerate launch --multi_gpu --num_processes N`, torchrun) is
    made DDP on CPU over gloo: accelerate would otherwise run N unaware copies of the job. An FSDP launch
    without CUDA is made FSDP2 on CPU over gloo: accelerate only enables FSDP on accelerator devices, while
    torch's `fully_shard` (what accelerate's FSDP2 path calls) runs on a CPU mesh; so the state accelerate
    builds for `cpu=True` gets the FSDP plugin of the launch configuration, and `prepare` then takes
    accelerate's own FSDP2 path. accelerate keeps one precision per process; a single-process run (tests,
    notebooks) that asks for another one resets it.
    """
    multi_process = int(os.environ.get("WORLD_SIZE", "1")) > 1
    fsdp = os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true")
    precision = config.mixed_precision
    if precision is None:
        precision = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if precision == "fp16" and not torch.cuda.is_available():
        raise MMComposeError("fp16 mixed precision needs a GPU (accelerate's CPU autocast ignores it); use bf16 on CPU")
    if not multi_process and AcceleratorState._shared_state and AcceleratorState().mixed_precision != precision:
        AcceleratorState._reset_state()
    on_cpu = multi_process and not torch.cuda.is_available()
    accelerator = Accelerator(cpu=on_cpu, mixed_precision=precision, gradient_accumulation_steps=config.grad_accum,
                              kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=find_unused)])
    if on_cpu and fsdp:
        plugin = FullyShardedDataParallelPlugin()
        if plugin.fsdp_version != 2:
            raise MMComposeError("FSDP on CPU needs fsdp_version: 2 (version 1 refuses CPU devices)")
        if precision != "no":
            plugin.set_mixed_precision(precision)
        accelerator.state.distributed_type = DistributedType.FSDP
        accelerator.state.fsdp_plugin = plugin
    return accelerator


class _GatheredModel:
    """What `save_checkpoint` reads from a model (spec, base, provenance, tensors), with the tensors gathered
    from a sharded run: under FSDP or DeepSpeed ZeRO-3 the model's own parameters are shards."""

    def __init__(self, model: MultimodalLLM, tensors: dict[str, torch.Tensor]) -> None:
        self.model, self._tensors = model, tensors

    def __getattr__(self, name: str) -> Any:  # spec, provenance, base_path, base_fingerprint: the model's own
        return getattr(self.model, name)

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        return self._tensors


def _sharded(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def _final_model(accelerator: Accelerator, module: nn.Module, model: MultimodalLLM,
                 dtypes: dict[str, torch.dtype]) -> Any:
    """The model to save: itself, or its full tensors gathered by accelerate (every process must call this;
    only the main process gets the tensors), in the dtypes they had before the engine took the model
    (DeepSpeed casts the model to bf16 and keeps float32 masters in its optimizer)."""
    if not _sharded(accelerator):
        return model
    state = accelerator.get_state_dict(module)
    if not accelerator.is_main_process:
        return None
    keys = {f"modalities.{name}.": f"model.branches.{name}." for name in model.branches}
    tensors = {}
    for name in model.checkpoint_tensors():
        if name.startswith("deltas."):
            _, delta, rest = name.split(".", 2)
            path, key = rest.rsplit(".", 1)
            tensors[name] = state[f"model.llm.{path}.deltas.{delta}.{key}"]
        else:
            prefix = next(p for p in keys if name.startswith(p))
            tensors[name] = state[keys[prefix] + name.removeprefix(prefix)]
    tensors = {name: value.detach().to("cpu", dtypes[name]).contiguous() for name, value in tensors.items()}
    return _GatheredModel(model, tensors)


def _step_seed(seed: int, step: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])


def _data_identity(samples: Sequence[Sample]) -> dict[str, Any]:
    return {"samples": len(samples), "first_id": samples[0].id, "last_id": samples[-1].id}


def trained_tensor_names(model: MultimodalLLM, trainable: Sequence[nn.Parameter],
                         pretrained_encoders: Sequence[str] = ()) -> list[str]:
    """The checkpoint tensors a run changes: its trainable parameters, plus the buffers (BatchNorm statistics)
    of a modality part that has any, plus the encoders of `pretrained_encoders` (changed by the LLM-free
    encoder pretraining before the first step). Everything else (base LLM, frozen encoders, frozen fresh
    deltas) is rebuilt bit for bit from the base and the seed, so a step checkpoint leaves it out."""
    pointers = {p.data_ptr() for p in trainable}
    tensors = model.checkpoint_tensors()
    trained = {name for name, value in tensors.items() if value.data_ptr() in pointers}
    trained |= {name for name in tensors if _part(name) in {f"modalities.{m}.encoder" for m in pretrained_encoders}}
    parts = {_part(name) for name in trained}
    buffers = {name for name in tensors if _part(name) in parts and name.rsplit(".", 1)[1] in BUFFER_NAMES}
    return sorted(trained | buffers)


def _part(name: str) -> str:
    """`modalities.<m>.<encoder|connector>` of a branch tensor name (boundary tokens are their own part)."""
    return ".".join(name.split(".")[:3])


def _save_state(directory: Path, model: MultimodalLLM, names: Sequence[str], optimizer: Any, scheduler: Any,
                state: dict[str, Any]) -> None:
    """A complete, atomic step checkpoint: the trained tensors, optimizer and trainer state."""
    optimizer_state = optimizer.state_dict()
    tensors = {f"{index}.{key}": value.detach().contiguous() for index, entry in optimizer_state["state"].items()
               for key, value in entry.items()}
    own = model.checkpoint_tensors()
    with atomic_directory(directory) as temporary:
        save_file({name: own[name].detach().contiguous() for name in names}, temporary / TRAINED_TENSORS)
        save_file(tensors, temporary / OPTIMIZER_TENSORS)
        (temporary / OPTIMIZER_FILE).write_text(json.dumps({"param_groups": optimizer_state["param_groups"]}) + "\n")
        (temporary / STATE_FILE).write_text(json.dumps({**state, "scheduler": scheduler.state_dict()}, indent=2) + "\n")


def _load_state(directory: Path, model: MultimodalLLM, names: Sequence[str], optimizer: Any,
                scheduler: Any) -> dict[str, Any]:
    saved = read_tensors([directory / TRAINED_TENSORS])
    if sorted(saved) != sorted(names):
        raise MMComposeError(f"{directory}: holds other trained tensors than this run trains; cannot resume")
    own = model.checkpoint_tensors()
    with torch.no_grad():
        for name, value in saved.items():
            own[name].copy_(value)
    entries: dict[int, dict[str, torch.Tensor]] = {}
    for name, tensor in read_tensors([directory / OPTIMIZER_TENSORS]).items():
        index, key = name.split(".", 1)
        entries.setdefault(int(index), {})[key] = tensor
    groups = json.loads((directory / OPTIMIZER_FILE).read_text())["param_groups"]
    optimizer.load_state_dict({"state": entries, "param_groups": groups})
    state = json.loads((directory / STATE_FILE).read_text())
    scheduler.load_state_dict(state.pop("scheduler"))
    return state


def step_checkpoints(out_dir: Path) -> list[Path]:
    """Complete step checkpoints (atomic writes leave only complete ones under their final name), oldest first."""
    folder = Path(out_dir) / CHECKPOINTS
    found = [p for p in folder.glob("step-*") if p.is_dir() and p.name.removeprefix("step-").isdigit()]
    return sorted(found, key=lambda p: int(p.name.removeprefix("step-")))


def train(model: MultimodalLLM, samples: Sequence[Sample | dict[str, Any]], data_root: str | Path,
          config: TrainConfig, out_dir: str | Path, *, resume: bool = False, progress: bool | None = None,
          skipped: Sequence[BadSample] = ()) -> dict[str, Any]:
    """Train `model` on `samples`; save to `out_dir`.

    `samples` are validated `Sample`s (from `mmcompose.data.dataset.load_training_samples`, media paths
    resolved), or raw records of any data layout, validated here with media paths relative to `data_root`.
    `skipped`: the records the loader left out, counted in the metrics with those too long for
    `config.data.max_length`. Media are decoded lazily by `config.data.num_workers` DataLoader workers;
    with `config.data.cache_features`, frozen encoders' outputs come from that feature cache.

    Writes `out_dir/log.jsonl` (mean loss every `log_every` steps), step checkpoints under
    `out_dir/checkpoints/step-N/` every `save_every` steps, the final model to `out_dir/model` and a summary
    to `out_dir/metrics.json` (returned), with `out_dir/skipped_samples.txt` (one line per skipped sample: file,
    index, field, reason) when any was skipped. With `resume`, training continues from the latest step checkpoint,
    which must come from the same configuration and data. Only the main process writes.
    """
    out_dir = Path(out_dir)
    if (out_dir / FINAL_MODEL).exists():
        raise MMComposeError(f"{out_dir / FINAL_MODEL} already exists: this run has finished")
    previous = step_checkpoints(out_dir)
    if previous and not resume:
        raise MMComposeError(f"{out_dir} holds step checkpoints of an earlier run; resume it or choose another "
                             "directory")
    if not samples:
        raise MMComposeError("no training samples")
    started = time.perf_counter()
    loaded = training_samples(samples, data_root, model, config.data.on_bad_sample)
    data = SampleDataset(model, loaded.samples, max_length=config.data.max_length)
    created = not out_dir.exists()
    try:
        return _run(model, data, [*skipped, *loaded.skipped], config, out_dir, previous if resume else [], progress,
                    started)
    except BaseException:
        # A run that stops before its first step checkpoint leaves nothing behind; a later stop keeps the
        # complete step checkpoints (and the log up to them), which is what --resume continues from.
        if created and out_dir.exists() and not step_checkpoints(out_dir) and PartialState().is_main_process:
            shutil.rmtree(out_dir, ignore_errors=True)
        raise


def _run(model: MultimodalLLM, data: SampleDataset, skipped: list[BadSample], config: TrainConfig, out_dir: Path,
         previous: list[Path], progress: bool | None, started: float) -> dict[str, Any]:
    cache_report = {}
    if config.data.cache_features is not None:
        if trained_encoders(model, config) or config.encoder_steps:
            raise MMComposeError("cache_features needs frozen encoders: set train_encoder false and encoder_steps 0")
        with PartialState().main_process_first():  # the main process encodes, the others then read
            cache_report = data.cache_features(model, config.data.cache_features)
    # Before DDP wraps the model; every process computes the same weights (same data, same seed). A resumed run
    # finds the pretrained encoders in its step checkpoint.
    encoder_losses = {}
    pretrained = [m for m in data.modalities if config.encoder_steps
                  and m not in model.provenance.get("frozen_encoders", [])]
    if not previous:
        for modality in pretrained:
            inputs, labels, num_classes = caption_classes((data[i] for i in range(len(data))), modality)
            encoder_losses[modality] = pretrain_encoder(
                model.branches[modality].encoder, inputs, labels, num_classes, steps=config.encoder_steps,
                batch_size=config.batch_size, lr=config.lr.encoder, seed=config.seed)
    groups = parameter_groups(model, config)
    described_groups = describe_groups(groups)  # peak rates, before the schedule changes them
    for delta in model.modules():
        if isinstance(delta, LoRADelta):
            delta.dropout = config.lora_dropout
    trainable = [p for group in groups for p in group["params"]]
    names = trained_tensor_names(model, trainable, pretrained)
    accelerator = _accelerator(len(data.modalities) > 1 or data.has_text_only, config)
    micro, world, accum = config.batch_size, accelerator.num_processes, config.grad_accum
    global_batch = micro * world * accum
    per_epoch = len(data) // global_batch
    if per_epoch == 0:
        raise MMComposeError(f"{len(data)} samples are fewer than one global batch of {global_batch} "
                             f"({micro} x {world} processes x {accum} accumulated)")
    total = config.steps or config.epochs * per_epoch
    if total > per_epoch:  # items come back: keep their decoded inputs (not for one pass over a large set)
        data.keep_decoded(KEEP_DECODED_BYTES)
    if config.gradient_checkpointing:
        model.llm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.999))
    scheduler = get_cosine_schedule_with_warmup(optimizer, round(config.warmup_ratio * total), total)
    if config.save_every and _sharded(accelerator):
        raise MMComposeError(f"step checkpoints (save_every) are not supported under "
                             f"{accelerator.distributed_type.value}: they would need the sharded optimizer state")
    engine = accelerator.distributed_type
    dtypes = {name: value.dtype for name, value in model.checkpoint_tensors().items()}
    loss_module, optimizer = accelerator.prepare(_LossModule(model, data.encoded), optimizer)
    # accelerate's FSDP2 preparation re-derives the state on a CPU mesh as MULTI_CPU; gathering the tensors
    # for saving must take the FSDP2 path again
    accelerator.state.distributed_type = engine
    identity = {"config": config.identity(), "data": _data_identity(data.samples), "processes": world}

    start, window = 0, []  # window: per-step losses since the last log record
    if previous:
        state = _load_state(previous[-1], model, names, optimizer, scheduler)
        if {k: state.get(k) for k in identity} != identity:
            raise MMComposeError(f"{previous[-1]}: saved by a run with other settings or data; cannot resume")
        start, window = state["step"], state["window"]
    log_path = out_dir / LOG_FILE
    records: list[dict[str, Any]] = []
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        if log_path.exists() and start:
            records = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
            records = [r for r in records if r["step"] <= start]
        atomic_write_text(log_path, "".join(json.dumps(r) + "\n" for r in records))

    model.train()
    frozen = set(model.branches) - trained_encoders(model, config)
    for name in frozen & set(model.provenance.get("frozen_encoders", [])):
        model.branches[name].encoder.eval()  # pretrained encoders keep their inference behaviour (BatchNorm, dropout)
    with ExitStack() as stack:
        bar = stack.enter_context(progress_bar(progress if accelerator.is_main_process else False))
        log = stack.enter_context(log_path.open("a")) if accelerator.is_main_process else None
        task = bar.add_task(f"{config.stage} {'+'.join(model.branches)}", total=total, completed=start, loss="-")
        batches = StepBatches(data, seed=config.seed, global_batch=global_batch, rank=accelerator.process_index,
                              world=accelerator.num_processes, group_by_length=config.group_by_length, start=start,
                              total=total)
        for step, examples in zip(range(start, total), step_loader(data, batches, config.data.num_workers),
                                  strict=True):
            torch.manual_seed(_step_seed(config.seed, step, accelerator.process_index))
            counted = torch.tensor(float(target_tokens(model, examples)), device=accelerator.device)
            num_items = accelerator.reduce(counted, reduction="sum").clamp(min=1.0)
            step_loss = torch.zeros((), device=accelerator.device)
            for index in range(accum):
                with accelerator.accumulate(loss_module):
                    loss, routes = loss_module(examples[index * micro:(index + 1) * micro], num_items)
                    # DDP averages gradients over processes and accelerate divides by the accumulation steps;
                    # both undone here, so the gradient is that of the step's token-mean loss.
                    with model.routing.route(routes):
                        accelerator.backward(loss * (world * accum))
                    step_loss += loss.detach()
            if config.grad_clip is not None and accelerator.sync_gradients:
                accelerator.clip_grad_norm_(trainable, config.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            window.append(accelerator.reduce(step_loss, reduction="sum").item())
            done = step + 1
            if done % config.log_every == 0 or done == total:
                record = {"step": done, "epoch": round(done / per_epoch, 3), "loss": sum(window) / len(window),
                          "lr": {g["name"]: g["lr"] for g in optimizer.param_groups},
                          "seconds": round(time.perf_counter() - started, 2)}
                records.append(record)
                window = []
                if log is not None:
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                bar.update(task, loss=f"{record['loss']:.4f}")
            bar.update(task, completed=done)
            if config.save_every and done % config.save_every == 0 and done < total:
                if accelerator.is_main_process:
                    _save_state(out_dir / CHECKPOINTS / f"step-{done}", model, names, optimizer, scheduler,
                                {**identity, "step": done, "window": window})
                    for stale in step_checkpoints(out_dir)[:-config.keep_last]:
                        shutil.rmtree(stale)
                accelerator.wait_for_everyone()
    model.eval()
    if config.gradient_checkpointing:
        model.llm.activation_checkpointing_disable()

    metrics = {
        "stage": config.stage, "strategy": model.spec.strategy, "modalities": list(model.branches),
        "samples": len(data), "steps": total, "epochs": round(total / per_epoch, 3), "global_batch": global_batch,
        "processes": world, "distributed": accelerator.distributed_type.value, "grad_accum": accum,
        "mixed_precision": accelerator.mixed_precision,
        "resumed_from_step": start, "encoder_pretraining_loss": encoder_losses,
        "trained_encoders": sorted(trained_encoders(model, config)),
        "parameter_groups": described_groups,
        "skipped_samples": {"invalid": len(skipped), "too_long": len(data.too_long)},
        "feature_cache": cache_report,
        "first_loss": records[0]["loss"] if records else None, "final_loss": records[-1]["loss"] if records else None,
        "seconds": round(time.perf_counter() - started, 2),
    }
    final = _final_model(accelerator, loss_module, model, dtypes)
    if accelerator.is_main_process:
        model.provenance = {**model.provenance, "stages": [
            *model.provenance.get("stages", []),
            {"stage": config.stage, "strategy": model.spec.strategy, "modalities": list(model.branches),
             "config": config.model_dump(mode="json"), "data": identity["data"], "steps": total}]}
        save_checkpoint(final, out_dir / FINAL_MODEL)
        atomic_write_text(out_dir / METRICS_FILE, json.dumps(metrics, indent=2) + "\n")
        if skipped or data.too_long:
            atomic_write_text(out_dir / SKIPPED_FILE, "".join(f"{line}\n" for line in [*skipped, *data.too_long]))
    accelerator.wait_for_everyone()
    return metrics
