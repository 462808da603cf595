"""Training data: benchmark-layout samples -> `Example`s with processed inputs, held in memory.

Decoding PNG/WAV/MP4 files would cost more than a training step of a small model, and training sees every
file many times (several epochs, several samples per rendering), so each file is processed once and its
tensor shared by every sample that uses it. Batch order is a pure function of (seed, epoch), so a resumed
run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmcompose.errors import InputError, MMComposeError
from mmcompose.model.assembly import Example
from mmcompose.model.conversation import format_conversation
from mmcompose.model.mllm import MultimodalLLM

Sample = dict[str, Any]


def load_samples(path: str | Path) -> list[Sample]:
    """A JSON list of `{id, conversations: [{from, value}], modal_inputs: {modality: [path]}}`, shape-checked."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MMComposeError(f"{path}: data file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise MMComposeError(f"{path}: not a readable JSON file ({error})") from None
    if not isinstance(raw, list) or not raw:
        raise MMComposeError(f"{path}: expected a non-empty JSON list of samples")
    for index, sample in enumerate(raw):
        where = f"{path}: sample #{index}"
        if not isinstance(sample, dict) or not {"id", "conversations"} <= sample.keys():
            raise MMComposeError(f"{where}: expected an object with 'id' and 'conversations'")
        turns = sample["conversations"]
        if not isinstance(turns, list) or not turns or not all(
                isinstance(t, dict) and t.get("from") in ("human", "gpt") and isinstance(t.get("value"), str)
                for t in turns):
            raise MMComposeError(f"{where}: 'conversations' must be a list of {{from: human|gpt, value: str}}")
        inputs = sample.get("modal_inputs", {})
        if not isinstance(inputs, dict) or not all(
                isinstance(files, list) and all(isinstance(f, str) for f in files) for files in inputs.values()):
            raise MMComposeError(f"{where}: 'modal_inputs' must map each modality to a list of paths")
    return raw


class ExampleSet:
    """The samples as `Example`s (prompt and target in the model's template, inputs processed once)."""

    def __init__(self, model: MultimodalLLM, samples: Sequence[Sample], data_root: str | Path) -> None:
        root = Path(data_root)
        cache: dict[tuple[str, Path], torch.Tensor] = {}
        self.examples: list[Example] = []
        for index, sample in enumerate(samples):
            name = str(sample.get("id", f"sample #{index}"))
            if sample["conversations"][-1]["from"] != "gpt":
                raise InputError(f"{name}: a training sample must end with the gpt turn to learn")
            inputs: dict[str, list[torch.Tensor]] = {}
            for modality, files in sample.get("modal_inputs", {}).items():
                if modality not in model.processors:
                    raise InputError(f"{name}: input of modality {modality!r}, which this model does not have "
                                     f"(it has: {', '.join(model.processors) or 'none'})")
                tensors = []
                for file in files:
                    path = root / file
                    if (modality, path) not in cache:
                        if not path.is_file():
                            raise InputError(f"{name}: {modality} file not found: {path}")
                        cache[modality, path] = model.processors[modality](path)
                    tensors.append(cache[modality, path])
                inputs[modality] = tensors
            prompt, target = format_conversation(sample["conversations"], model.spec.template)
            self.examples.append(Example(prompt=prompt, inputs=inputs, target=target, id=name))
        self.modalities = sorted({m for example in self.examples for m in example.inputs})

    def __len__(self) -> int:
        return len(self.examples)

    def order(self, seed: int, epoch: int) -> np.ndarray:
        """The permutation of sample indices for `epoch`: the same for every process and every resume."""
        return np.random.default_rng((seed, epoch)).permutation(len(self.examples))

    def batch(self, seed: int, step: int, global_batch: int, rank: int, world: int) -> list[Example]:
        """This process's share of the global batch of optimizer step `step` (0-based).

        An epoch is `len // global_batch` steps (the incomplete tail is dropped; reshuffling moves different
        samples into it each epoch); process `rank` takes every `world`-th example of the global batch.
        """
        per_epoch = len(self.examples) // global_batch
        epoch, position = divmod(step, per_epoch)
        indices = self.order(seed, epoch)[position * global_batch:(position + 1) * global_batch]
        return [self.examples[i] for i in indices[rank::world]]
