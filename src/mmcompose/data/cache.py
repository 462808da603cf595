"""Feature cache for frozen encoders: each medium is encoded once, and every later epoch and run reads it.

A frozen encoder's output for a file depends on the file's bytes, the processor that turns them into a
tensor and the encoder (its spec and weights), nothing else. So features are keyed by the SHA-256 of the
file and stored under a directory named by a fingerprint of the rest::

    DIR/<modality>-<fingerprint>/index.json            file digest -> shard name
    DIR/<modality>-<fingerprint>/shard-<hash>.safetensors   one tensor per file digest, (tokens, width)

A different encoder (or processor, or weights) has another fingerprint and never reads these features.
Shards and the index are written to temporary names and renamed, so an interrupted run leaves a usable
cache. Features are computed with the encoder in eval mode and without gradients, in float32 unless the
encoder's weights are another dtype; a frozen encoder is meant to be used in eval mode, so a dropout in
a frozen encoder is switched off here where live encoding during training would have applied it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from mmcompose.errors import InputError
from mmcompose.files import atomic_write_text
from mmcompose.model.spec import ModalitySpec

INDEX_FILE = "index.json"
SHARD_SIZE = 1024
"""Features per shard: shards of (1024 x tokens x width) floats stay a few hundred MB for CLIP-L."""


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def encoder_fingerprint(spec: ModalitySpec, encoder: nn.Module) -> str:
    """SHA-256 over the processor and encoder specs and every encoder tensor (name, dtype, shape, bytes)."""
    digest = hashlib.sha256(json.dumps({"processor": spec.processor.model_dump(mode="json"),
                                        "encoder": spec.encoder.model_dump(mode="json")},
                                       sort_keys=True).encode())
    for name, tensor in sorted(encoder.state_dict().items()):
        value = tensor.detach().cpu().contiguous()
        digest.update(f"{name}\0{value.dtype}\0{tuple(value.shape)}\0".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return digest.hexdigest()


class FeatureCache:
    """The cached features of one modality's frozen encoder; build with :meth:`prepare`, read with :meth:`load`."""

    def __init__(self, directory: Path, modality: str, fingerprint: str) -> None:
        self.directory = Path(directory) / f"{modality}-{fingerprint[:24]}"
        self.modality = modality
        index = self.directory / INDEX_FILE
        self.index: dict[str, str] = json.loads(index.read_text(encoding="utf-8")) if index.is_file() else {}
        self.hits = 0
        self.computed = 0

    @classmethod
    def prepare(cls, directory: Path, spec: ModalitySpec, encoder: nn.Module,
                processor: Callable[[Path], torch.Tensor], files: Sequence[Path], *,
                batch_size: int = 16) -> tuple[FeatureCache, list[str]]:
        """The cache for `encoder`, holding the features of every file in `files`; returns it and each file's
        digest (in the order of `files`). Files not yet cached are processed, encoded in batches and written
        as new shards; the rest are only digested."""
        cache = cls(directory, spec.name, encoder_fingerprint(spec, encoder))
        digests = [file_digest(path) for path in files]
        missing = list(dict.fromkeys(d for d in digests if d not in cache.index))
        cache.hits = len(set(digests)) - len(missing)
        if missing:
            source = {d: path for d, path in zip(digests, files, strict=True)}
            parameter = next(encoder.parameters(), None)
            device = parameter.device if parameter is not None else torch.device("cpu")
            dtype = parameter.dtype if parameter is not None else torch.float32
            was_training = encoder.training
            encoder.eval()
            try:
                for start in range(0, len(missing), SHARD_SIZE):
                    chunk = missing[start:start + SHARD_SIZE]
                    features: dict[str, torch.Tensor] = {}
                    for offset in range(0, len(chunk), batch_size):
                        keys = chunk[offset:offset + batch_size]
                        stacked = torch.stack([processor(source[key]) for key in keys]).to(device)
                        if stacked.is_floating_point():
                            stacked = stacked.to(dtype)
                        with torch.no_grad():
                            encoded = encoder(stacked)
                        features |= {key: encoded[i].detach().cpu().contiguous() for i, key in enumerate(keys)}
                    cache._write_shard(features)
            finally:
                encoder.train(was_training)
            cache.computed = len(missing)
        return cache, digests

    def _write_shard(self, features: dict[str, torch.Tensor]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        name = "shard-" + hashlib.sha256("".join(sorted(features)).encode()).hexdigest()[:16] + ".safetensors"
        temporary = self.directory / f".{name}.{os.getpid()}.tmp"
        save_file(features, temporary)
        os.replace(temporary, self.directory / name)
        # Re-read the index: another process may have added shards since this cache was opened.
        index = self.directory / INDEX_FILE
        current = json.loads(index.read_text(encoding="utf-8")) if index.is_file() else {}
        self.index = {**current, **dict.fromkeys(features, name)}
        atomic_write_text(index, json.dumps(self.index, sort_keys=True) + "\n")

    def load(self, digest: str) -> torch.Tensor:
        """The cached features of the file with `digest`."""
        shard = self.index.get(digest)
        if shard is None:
            raise InputError(f"{self.directory}: no cached {self.modality} features for file digest {digest[:12]}")
        with safe_open(self.directory / shard, framework="pt") as handle:
            return handle.get_tensor(digest)
