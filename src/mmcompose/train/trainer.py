"""Train modality models (DESIGN.md §1-2): stage 1 aligns a modality's encoder and connector on captions with
the LLM frozen; stage 2 instruction-tunes the LLM deltas (`shared`, `decoupled`, `full`) with the branches.

Runs under `accelerate` (one process, or `accelerate launch` DDP, gloo on CPU). Step checkpoints hold the
model, optimizer and scheduler as safetensors + JSON (nothing pickled), and a resumed run ends with exactly the
weights of an uninterrupted one: batch order is a function of (seed, epoch), each step's RNG is seeded from
(seed, step, rank), and the step count is fixed up front.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import yaml
from accelerate import Accelerator, DistributedDataParallelKwargs, PartialState
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import get_cosine_schedule_with_warmup

from mmcompose.checkpoint.manifest import read_manifest
from mmcompose.checkpoint.store import TENSOR_FILE, read_tensors, save_checkpoint
from mmcompose.data.dataset import DataOptions, SampleDataset, StepBatches, step_loader, training_samples
from mmcompose.data.samples import BadSample, Sample
from mmcompose.errors import CheckpointError, MMComposeError
from mmcompose.files import atomic_directory, atomic_write_text
from mmcompose.model.assembly import Example
from mmcompose.model.mllm import MultimodalLLM, modality_spec
from mmcompose.model.spec import ModalitySpec, Strategy
from mmcompose.train.encoder import caption_classes, pretrain_encoder
from mmcompose.train.progress import progress_bar

CHECKPOINTS, FINAL_MODEL, LOG_FILE, METRICS_FILE = "checkpoints", "model", "log.jsonl", "metrics.json"
STATE_FILE, OPTIMIZER_TENSORS, OPTIMIZER_FILE = "trainer_state.json", "optimizer.safetensors", "optimizer.json"
SKIPPED_FILE = "skipped_samples.txt"


class LearningRates(BaseModel):
    """Peak learning rate per parameter group."""

    model_config = ConfigDict(extra="forbid")
    encoder: float = Field(1e-3, ge=0)
    connector: float = Field(1e-3, ge=0)
    boundary: float = Field(1e-3, ge=0)
    deltas: float = Field(1e-3, ge=0)


class TrainConfig(BaseModel):
    """One training run. `pretrain` trains the branches (encoder if `train_encoder`, connector, boundary
    tokens) with the LLM and its deltas frozen; `instruct` trains the deltas as well."""

    model_config = ConfigDict(extra="forbid")
    stage: Literal["pretrain", "instruct"]
    train_encoder: bool = True
    encoder_steps: int = Field(0, ge=0, description="pretrain stage: LLM-free encoder pretraining steps first "
                                                    "(see train.encoder); at lr.encoder")
    lr: LearningRates = Field(default_factory=LearningRates)
    weight_decay: float = Field(0.0, ge=0)
    batch_size: int = Field(16, gt=0, description="per process")
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
                                                     "data": {"num_workers", "cache_features"}})


def load_config(path: str | Path | None = None, **overrides: Any) -> TrainConfig:
    """A `TrainConfig` from an optional YAML file of its fields, with `overrides` (None values ignored) on top."""
    values: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
            raise MMComposeError(f"{path}: cannot read the training config ({' '.join(str(error).split())})") from None
        if not isinstance(loaded, dict):
            raise MMComposeError(f"{path}: a training config is a mapping of TrainConfig fields")
        values = loaded
    values.update({key: value for key, value in overrides.items() if value is not None})
    try:
        return TrainConfig.model_validate(values)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "config"
        raise MMComposeError(f"{path or 'training config'}: {where}: {first['msg']}") from None


def build_model(base: str | Path, modalities: Sequence[str | ModalitySpec], *, strategy: Strategy,
                rank: int = 16, alpha: float = 32.0, start_from: Sequence[str | Path] = (), seed: int = 0,
                template: str | None = None) -> MultimodalLLM:
    """A model to train on `base`: new deltas per `strategy`, modality branches taken from `start_from`.

    Stage 2 starts from stage 1 this way: the modality specs (encoder and connector options) and branch
    tensors come from the stage-1 checkpoints, while the deltas are created fresh (LoRA B = 0, so the
    starting model computes exactly what stage 1 did). Several `start_from` checkpoints can supply different
    modalities, e.g. four single-modality stage-1 models for a joint stage 2. The seed fixes the fresh parts.
    """
    names = [m if isinstance(m, str) else m.name for m in modalities]
    sources: dict[str, tuple[ModalitySpec, Path]] = {}
    templates = set()
    for path in map(Path, start_from):
        manifest = read_manifest(path)
        templates.add(manifest.model.template)
        for spec in manifest.model.modalities:
            if spec.name in names and spec.name in sources:
                raise MMComposeError(f"modality {spec.name!r} is in both {sources[spec.name][1]} and {path}")
            sources[spec.name] = (spec, path)
    if start_from:
        missing = [name for name in names if name not in sources]
        if missing:
            raise MMComposeError(f"modality {missing[0]!r} is in none of the start checkpoints "
                                 f"({', '.join(map(str, start_from))})")
        if len(templates) > 1:
            raise MMComposeError(f"the start checkpoints use different templates: {', '.join(sorted(templates))}")
    specs = [sources[n][0] if n in sources else m if isinstance(m, ModalitySpec) else modality_spec(n)
             for n, m in zip(names, modalities, strict=True)]
    torch.manual_seed(seed)
    model = MultimodalLLM.from_base(base, specs, strategy=strategy, rank=rank, alpha=alpha,
                                    template=template or (templates.pop() if templates else "plain"))
    own = model.checkpoint_tensors()
    stages: list[Any] = []
    for path in dict.fromkeys(sources[name][1] for name in names if name in sources):
        manifest = read_manifest(path)
        if manifest.base.fingerprint != model.base_fingerprint:
            raise CheckpointError(f"{path}: trained on a different base LLM than {base}")
        stages += manifest.provenance.get("stages", [])
        wanted = tuple(f"modalities.{name}." for name in names if name in sources and sources[name][1] == path)
        with torch.no_grad():
            for key, tensor in read_tensors(path, manifest.files).items():
                if key.startswith(wanted):
                    own[key].copy_(tensor)
    model.provenance = {"stages": stages}
    return model


def _parameter_groups(model: MultimodalLLM, config: TrainConfig) -> list[dict[str, Any]]:
    """Freeze everything, then unfreeze what the stage trains, as AdamW groups with their own learning rate.
    Weight decay applies to weight matrices only, never to boundary tokens, norms or biases."""
    model.requires_grad_(False)
    named: dict[str, list[tuple[str, nn.Parameter]]] = {"encoder": [], "connector": [], "boundary": [], "deltas": []}
    for branch in model.branches.values():
        if config.train_encoder:
            named["encoder"] += list(branch.encoder.named_parameters())
        named["connector"] += list(branch.connector.named_parameters())
        named["boundary"] += [("boundary", p) for p in (branch.prefix, branch.suffix) if p is not None]
    if config.stage == "instruct":
        named["deltas"] += [(n, p) for layer in model.routed.values() for n, p in layer.deltas.named_parameters()]
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


class _LossModule(nn.Module):
    """Assembly and LLM forward in one module, so DDP sees the branches and deltas used in one forward pass."""

    def __init__(self, model: MultimodalLLM, encoded: Sequence[str] = ()) -> None:
        super().__init__()
        self.model, self.encoded = model, tuple(encoded)

    def forward(self, examples: list[Example]) -> torch.Tensor:
        return self.model(self.model.assemble(examples, padding_side="right", encoded=self.encoded)).loss


def _accelerator(find_unused: bool) -> Accelerator:
    """The run's `Accelerator`. `find_unused` tells DDP that a step may leave parameters unused: in joint
    training or with text-only samples, a batch without some modality never reaches its branch or delta.

    Without CUDA, a multi-process launch (`accelerate launch --multi_gpu --num_processes N`, torchrun) is
    made DDP on CPU over gloo: accelerate would otherwise run N unaware copies of the job.
    """
    multi_process = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return Accelerator(cpu=multi_process and not torch.cuda.is_available(),
                       kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=find_unused)])


def _step_seed(seed: int, step: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])


def _data_identity(samples: Sequence[Sample]) -> dict[str, Any]:
    return {"samples": len(samples), "first_id": samples[0].id, "last_id": samples[-1].id}


def _save_state(directory: Path, model: MultimodalLLM, optimizer: Any, scheduler: Any, state: dict[str, Any]) -> None:
    """A complete, atomic step checkpoint: the mmcompose checkpoint plus optimizer and trainer state."""
    optimizer_state = optimizer.state_dict()
    tensors = {f"{index}.{key}": value.detach().contiguous() for index, entry in optimizer_state["state"].items()
               for key, value in entry.items()}
    with atomic_directory(directory) as temporary:
        save_checkpoint(model, temporary / FINAL_MODEL)
        save_file(tensors, temporary / OPTIMIZER_TENSORS)
        (temporary / OPTIMIZER_FILE).write_text(json.dumps({"param_groups": optimizer_state["param_groups"]}) + "\n")
        (temporary / STATE_FILE).write_text(json.dumps({**state, "scheduler": scheduler.state_dict()}, indent=2) + "\n")


def _load_state(directory: Path, model: MultimodalLLM, optimizer: Any, scheduler: Any) -> dict[str, Any]:
    checkpoint = directory / FINAL_MODEL
    model.load_checkpoint_tensors(read_tensors(checkpoint, [TENSOR_FILE]))
    entries: dict[int, dict[str, torch.Tensor]] = {}
    for name, tensor in load_file(directory / OPTIMIZER_TENSORS).items():
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
    skipped = [*skipped, *loaded.skipped]
    cache_report = {}
    if config.data.cache_features is not None:
        if config.train_encoder or config.encoder_steps:
            raise MMComposeError("cache_features needs frozen encoders: set train_encoder false and encoder_steps 0")
        with PartialState().main_process_first():  # the main process encodes, the others then read
            cache_report = data.cache_features(model, config.data.cache_features)
    # Before DDP wraps the model; every process computes the same weights (same data, same seed). A resumed run
    # finds the pretrained encoders in its step checkpoint.
    encoder_losses = {}
    if config.encoder_steps and not (resume and previous):
        for modality in data.modalities:
            inputs, labels, num_classes = caption_classes((data[i] for i in range(len(data))), modality)
            encoder_losses[modality] = pretrain_encoder(
                model.branches[modality].encoder, inputs, labels, num_classes, steps=config.encoder_steps,
                batch_size=config.batch_size, lr=config.lr.encoder, seed=config.seed)
    groups = _parameter_groups(model, config)
    accelerator = _accelerator(find_unused=len(data.modalities) > 1 or data.has_text_only)
    global_batch = config.batch_size * accelerator.num_processes
    per_epoch = len(data) // global_batch
    if per_epoch == 0:
        raise MMComposeError(f"{len(data)} samples are fewer than one global batch of {global_batch} "
                             f"({config.batch_size} x {accelerator.num_processes} processes)")
    total = config.steps or config.epochs * per_epoch
    optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.999))
    scheduler = get_cosine_schedule_with_warmup(optimizer, round(config.warmup_ratio * total), total)
    loss_module, optimizer = accelerator.prepare(_LossModule(model, data.encoded), optimizer)
    trainable = [p for group in groups for p in group["params"]]
    identity = {"config": config.identity(), "data": _data_identity(data.samples),
                "processes": accelerator.num_processes}

    start, window = 0, []  # window: per-step losses since the last log record
    if resume and previous:
        state = _load_state(previous[-1], model, optimizer, scheduler)
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
            loss = loss_module(examples)
            accelerator.backward(loss)
            if config.grad_clip is not None:
                accelerator.clip_grad_norm_(trainable, config.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            window.append(accelerator.reduce(loss.detach(), reduction="mean").item())
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
                    _save_state(out_dir / CHECKPOINTS / f"step-{done}", model, optimizer, scheduler,
                                {**identity, "step": done, "window": window})
                    for stale in step_checkpoints(out_dir)[:-config.keep_last]:
                        shutil.rmtree(stale)
                accelerator.wait_for_everyone()
    model.eval()

    metrics = {
        "stage": config.stage, "strategy": model.spec.strategy, "modalities": list(model.branches),
        "samples": len(data), "steps": total, "epochs": round(total / per_epoch, 3), "global_batch": global_batch,
        "processes": accelerator.num_processes, "resumed_from_step": start,
        "encoder_pretraining_loss": encoder_losses,
        "skipped_samples": {"invalid": len(skipped), "too_long": len(data.too_long)},
        "feature_cache": cache_report,
        "first_loss": records[0]["loss"] if records else None, "final_loss": records[-1]["loss"] if records else None,
        "seconds": round(time.perf_counter() - started, 2),
    }
    if accelerator.is_main_process:
        model.provenance = {**model.provenance, "stages": [
            *model.provenance.get("stages", []),
            {"stage": config.stage, "strategy": model.spec.strategy, "modalities": list(model.branches),
             "config": config.model_dump(mode="json"), "data": identity["data"], "steps": total}]}
        save_checkpoint(model, out_dir / FINAL_MODEL)
        atomic_write_text(out_dir / METRICS_FILE, json.dumps(metrics, indent=2) + "\n")
        if skipped or data.too_long:
            atomic_write_text(out_dir / SKIPPED_FILE, "".join(f"{line}\n" for line in [*skipped, *data.too_long]))
    accelerator.wait_for_everyone()
    return metrics
