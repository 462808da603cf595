"""What every importer shares: accounting for every key of a foreign state dict (read with
`mmcompose.tensorfiles.load_state_dict`), and building the mmcompose model an import fills without loading
the base LLM's weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig

from mmcompose.checkpoint import fingerprint_base
from mmcompose.errors import CheckpointError, preview
from mmcompose.model import ModelSpec, MultimodalLLM

# The fields that decide whether two LLM configs describe the same network (vocabulary size is compared
# separately: multimodal fine-tunes often append tokens such as `<image>`).
ARCHITECTURE_FIELDS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
                       "num_attention_heads", "num_key_value_heads", "head_dim")


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
