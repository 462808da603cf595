"""What every importer shares: accounting for every key of a foreign state dict (read with
`mmcompose.tensorfiles.load_state_dict`), building the mmcompose model an import fills without loading
the base LLM's weights, and turning a fully fine-tuned LLM into a delta on the base (`LLMChange`)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from rich.progress import Progress
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig

from mmcompose.checkpoint import fingerprint_base
from mmcompose.errors import CheckpointError, preview
from mmcompose.model import DeltaSpec, ModelSpec, MultimodalLLM
from mmcompose.model.conversation import TEMPLATES
from mmcompose.model.routed import DEFAULT_TARGET_MODULES
from mmcompose.tensorfiles import TensorReader, load_state_dict, weight_files

# The fields that decide whether two LLM configs describe the same network (vocabulary size is compared
# separately: multimodal fine-tunes often append tokens such as `<image>`).
ARCHITECTURE_FIELDS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
                       "num_attention_heads", "num_key_value_heads", "head_dim")
# Buffers older checkpoints saved that the model recomputes (never learned): skipped on both sides.
DERIVED_BUFFERS = ("embeddings.position_ids", "rotary_emb.inv_freq")
# Pickled weight shards as LLaVA-style training code saves them (read with `weights_only=True` only).
PICKLE_SHARDS = ("pytorch_model*.bin", "model*.bin")


class SourceKeys:
    """A foreign state dict consumed key by key, so that nothing is silently dropped or invented.

    `take` records a missing key instead of failing at once, so that one error names all the gaps;
    `finish` then refuses missing keys first and unconsumed (unknown) keys second.
    """

    def __init__(self, tensors: dict[str, torch.Tensor], where: str, strip_prefix: str = "") -> None:
        self.where = where
        self.original = {name.removeprefix(strip_prefix): name for name in tensors}
        if len(self.original) != len(tensors):
            raise CheckpointError(f"{where}: keys appear both with and without the {strip_prefix!r} prefix")
        self.pending = {name.removeprefix(strip_prefix): tensor for name, tensor in tensors.items()}
        self.missing: list[str] = []

    def take(self, name: str) -> torch.Tensor:
        if name not in self.pending:
            self.missing.append(name)
            return torch.empty(0)
        return self.pending.pop(name)

    def take_optional(self, name: str) -> torch.Tensor | None:
        return self.pending.pop(name, None)

    def matching(self, prefix: str) -> list[str]:
        return sorted(name for name in self.pending if name.startswith(prefix))

    def finish(self) -> None:
        if self.missing:
            raise CheckpointError(f"{self.where}: {len(self.missing)} expected key(s) missing: {preview(self.missing)}")
        if self.pending:
            unknown = [self.original[name] for name in self.pending]
            raise CheckpointError(f"{self.where}: {len(unknown)} unknown key(s): {preview(unknown)}")


def check_same_llm(config: dict[str, Any], base_config: dict[str, Any], where: str) -> None:
    """Refuse a checkpoint whose LLM is not the base's architecture, before any tensor is read."""
    for field in ARCHITECTURE_FIELDS:
        ours, theirs = base_config.get(field), config.get(field)
        if ours is not None and theirs is not None and ours != theirs:
            raise CheckpointError(f"{where}: its LLM has {field}={theirs}, the base LLM has {field}={ours}; "
                                  f"it was not fine-tuned from this base")
    if config.get("vocab_size", 0) < base_config.get("vocab_size", 0):
        raise CheckpointError(f"{where}: its vocabulary ({config.get('vocab_size')}) is smaller than the base "
                              f"LLM's ({base_config.get('vocab_size')})")


def hf_config(directory: Path) -> PretrainedConfig:
    """A local transformers config, with transformers' own failures turned into one-line errors."""
    if not (directory / "config.json").is_file():
        raise CheckpointError(f"{directory}: no config.json")
    try:
        return AutoConfig.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError, KeyError) as error:
        raise CheckpointError(f"{directory}: unreadable config.json ({str(error).splitlines()[0]})") from None


def base_config(base: Path) -> dict[str, Any]:
    return hf_config(base).to_dict()


def skeleton(base: Path, spec: ModelSpec, fingerprint: str | None = None) -> MultimodalLLM:
    """The model `spec` describes on `base`, with the base LLM's weights left on the meta device.

    An import only needs the tensors a checkpoint stores (branches and deltas), so it never pays for
    loading a 7B LLM. The deltas are materialised (uninitialised) on the CPU, ready to be filled; the
    dtype is the one `load_checkpoint` will later build, so the saved checkpoint loads strictly.
    """
    config = hf_config(base)
    with torch.device("meta"):
        llm = AutoModelForCausalLM.from_config(config)
    try:
        tokenizer = AutoTokenizer.from_pretrained(base, local_files_only=True)
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{base}: no usable tokenizer ({str(error).splitlines()[0]})") from None
    model = MultimodalLLM(llm, tokenizer, spec, base, fingerprint or fingerprint_base(base))
    for layer in model.routed.values():
        layer.deltas.to_empty(device="cpu")
    return model


class Filler:
    """Copies imported tensors straight into the model's own storage (cast to its dtypes), so an import holds
    one copy of the converted weights; `save` refuses to write until every stored tensor has been filled."""

    def __init__(self, model: MultimodalLLM, where: str) -> None:
        self.model, self.where = model, where
        self.targets = model.checkpoint_tensors()  # views of the model's parameters
        self.filled: set[str] = set()

    def put(self, name: str, value: torch.Tensor, source: str | None = None) -> None:
        target = self.targets.get(name)
        label = source or name
        if target is None:
            raise CheckpointError(f"{self.where}: {label} has no place in the imported model")
        if value.shape != target.shape:
            raise CheckpointError(f"{self.where}: {label} has shape {tuple(value.shape)}, expected "
                                  f"{tuple(target.shape)}")
        with torch.no_grad():
            target.copy_(value)
        self.filled.add(name)

    def keep(self, prefix: str) -> None:
        """Keep the model's own values for every tensor under `prefix` (e.g. an encoder its factory loaded)."""
        self.filled.update(name for name in self.targets if name.startswith(prefix))

    def save(self, out: Path, *, overwrite: bool, provenance: dict[str, Any]) -> Path:
        unfilled = self.targets.keys() - self.filled
        if unfilled:
            raise CheckpointError(f"{self.where}: {len(unfilled)} tensor(s) of the imported model have no source: "
                                  f"{preview(unfilled)}")
        self.model.provenance = provenance
        return self.model.save_pretrained(out, overwrite=overwrite)


def check_template(template: str) -> str:
    """A fixed text template an imported model is recorded with (the composition needs one for all inputs)."""
    if template not in TEMPLATES:
        raise CheckpointError(f"--template {template!r}: expected one of {', '.join(TEMPLATES)}")
    return template


def source_tensors(directory: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Every `(name, tensor)` of a checkpoint directory, one at a time from safetensors, or shard by shard from
    pickled `pytorch_model*.bin` files (read with `weights_only=True`) when it has no safetensors."""
    if any(Path(directory).glob("*.safetensors")):
        with TensorReader(weight_files(directory)) as reader:
            for name in sorted(reader.names()):
                yield name, reader.get(name)
        return
    shards = sorted({file for pattern in PICKLE_SHARDS for file in Path(directory).glob(pattern)})
    if not shards:
        raise CheckpointError(f"{directory}: no *.safetensors or pytorch_model*.bin weights")
    for shard in shards:
        yield from sorted(load_state_dict(shard).items())


def llm_delta_specs(svd_rank: int | None, routes: list[str], source: dict[str, Any]) -> list[DeltaSpec]:
    """The one delta a fully fine-tuned LLM becomes: dense `full`, or a `shared` LoRA of rank `svd_rank`."""
    if svd_rank is None:
        return [DeltaSpec(name="full", kind="dense", routes=routes, source=source)]
    if svd_rank < 1:
        raise CheckpointError(f"--svd-rank must be at least 1, got {svd_rank}")
    return [DeltaSpec(name="shared", kind="lora", routes=routes, rank=svd_rank, alpha=float(svd_rank),
                      source={**source, "svd_rank": svd_rank})]


class LLMChange:
    """A fully fine-tuned LLM as what it changed on the base, fed one tensor at a time (names in the stock
    causal-LM layout: `model.layers...`, `lm_head.weight`).

    On every target linear the change `W_ft - W_base` becomes the model's one delta: dense, or compressed to a
    LoRA of `svd_rank` by truncated SVD, whose relative Frobenius error is measured exactly from the dropped
    singular values. Everything else (embeddings, norms, lm_head, biases) must equal the base's: only a change
    of the target linears can be represented, so any other difference is refused rather than lost. Rows of
    tokens the fine-tune appended to the vocabulary (`<image>`, `<video>`, padding) are dropped and recorded
    (our placeholders never reach the embedding table); the base vocabulary's rows must match. Used as a context
    manager, it shows its progress over the target linears.
    """

    def __init__(self, filler: Filler, base: TensorReader, base_config: dict[str, Any], vocab_size: int,
                 delta: DeltaSpec, where: str) -> None:
        self.filler, self.base, self.base_config, self.vocab_size = filler, base, base_config, vocab_size
        self.delta, self.where = delta, where
        self.linears = {f"{path}.weight": path for path in filler.model.routed}
        self.svd = _SVDReport(delta.rank) if delta.kind == "lora" else None
        self.seen: set[str] = set()
        self.notes: set[str] = set()
        self.progress = Progress(transient=True)  # a 7B LLM has 224 target linears; an SVD of each takes seconds
        self.task = self.progress.add_task("LLM change" if self.svd is None else "LLM change (SVD)",
                                           total=len(self.linears))

    def __enter__(self) -> LLMChange:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def add(self, llm_name: str, value: torch.Tensor, source_name: str) -> None:
        base_name = self._base_name(llm_name)
        self.seen.add(base_name)
        reference = self.base.get(base_name)
        if llm_name not in self.linears:
            self._check_unchanged(source_name, value, reference)
            return
        path = self.linears[llm_name]
        difference = value.float() - reference.float()
        prefix = f"deltas.{self.delta.name}.{path}"
        if self.svd is None:
            self.filler.put(f"{prefix}.weight", difference, source_name)
        else:
            lora_a, lora_b = self.svd.factor(difference)
            self.filler.put(f"{prefix}.lora_A", lora_a, source_name)
            self.filler.put(f"{prefix}.lora_B", lora_b, source_name)
        self.progress.advance(self.task)

    def finish(self) -> dict[str, Any]:
        """Refuse a base tensor the fine-tune has no counterpart of; the provenance entries: notes, SVD error."""
        unmatched = sorted(name for name in set(self.base.names()) - self.seen if not name.endswith(DERIVED_BUFFERS))
        if unmatched:
            raise CheckpointError(f"{self.where}: its LLM has no counterpart of the base LLM's {unmatched[0]}")
        provenance: dict[str, Any] = {}
        if self.svd is not None:
            provenance.update(self.svd.summary())
            self.notes.add(f"LLM delta compressed to rank {self.svd.rank}: relative Frobenius error "
                           f"{provenance['svd_relative_error']:.3g} "
                           f"(worst layer {provenance['svd_max_layer_relative_error']:.3g})")
        provenance["notes"] = sorted(self.notes)
        return provenance

    def _base_name(self, llm_name: str) -> str:
        if llm_name in self.base:
            return llm_name
        if llm_name == "lm_head.weight" and self.base_config.get("tie_word_embeddings"):
            return "model.embed_tokens.weight"
        raise CheckpointError(f"{self.where}: its LLM has {llm_name}, which the base LLM does not")

    def _check_unchanged(self, name: str, value: torch.Tensor, reference: torch.Tensor) -> None:
        base_vocab = self.base_config.get("vocab_size")
        if value.shape != reference.shape:
            appended = (value.dim() == 2 and value.shape[1:] == reference.shape[1:]
                        and value.shape[0] == self.vocab_size and reference.shape[0] == base_vocab)
            if not appended:
                expected = f"vocabulary {self.vocab_size}: " if value.shape[0] != self.vocab_size else ""
                raise CheckpointError(f"{self.where}: {name} has shape {tuple(value.shape)} ({expected}the base "
                                      f"LLM's has {tuple(reference.shape)})")
            value = value[:base_vocab]
            self.notes.add(f"dropped {self.vocab_size - base_vocab} vocabulary row(s) appended beyond the base's "
                           f"{base_vocab} (e.g. <image>)")
        common = value.dtype if value.element_size() < reference.element_size() else reference.dtype
        if not torch.equal(value.to(common), reference.to(common)):
            raise CheckpointError(f"{self.where}: {name} differs from the base LLM's; only the target linears "
                                  f"({', '.join(DEFAULT_TARGET_MODULES)}) can carry the fine-tune")


class _SVDReport:
    """Truncated SVD of each delta, with the exact error: `||D - D_r||_F^2` is the sum of the dropped `sigma^2`."""

    def __init__(self, rank: int) -> None:
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
