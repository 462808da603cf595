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
from transformers.trainer_pt_utils import get_length_grouped_indices

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
        self.lengths = self._lengths(model)
        self._order: tuple[tuple[int, int, int] | None, np.ndarray] = (None, np.empty(0, dtype=np.int64))

    def _lengths(self, model: MultimodalLLM) -> list[int]:
        """Each example's sequence length, up to a constant (special tokens): its text tokens without the
        placeholders plus the positions each of its inputs takes."""
        per_input = {m: model.input_length(m, next(e.inputs[m][0] for e in self.examples if m in e.inputs))
                     for m in self.modalities}
        placeholders = [spec.placeholder for spec in model.spec.modalities]
        texts = model.tokenizer([_without(e.prompt, placeholders) + e.target for e in self.examples],
                                add_special_tokens=False)["input_ids"]
        return [len(text) + sum(per_input[m] * len(xs) for m, xs in e.inputs.items())
                for text, e in zip(texts, self.examples, strict=True)]

    def __len__(self) -> int:
        return len(self.examples)

    def order(self, seed: int, epoch: int, group: int = 0) -> np.ndarray:
        """The permutation of sample indices for `epoch`: the same for every process and every resume.

        With `group` (the global batch size), each run of `group` consecutive indices holds examples of similar
        length (transformers' length grouping, as LLaVA's `group_by_modality_length`): a batch that mixes one-input
        and four-input questions pads the short ones to the long one, measured as half the tokens of a batch.
        """
        key = (seed, epoch, group)
        if self._order[0] != key:  # computed once per epoch, not once per step
            if group:
                state = int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])
                generator = torch.Generator().manual_seed(state)
                order = np.array(get_length_grouped_indices(self.lengths, group, generator=generator))
            else:
                order = np.random.default_rng((seed, epoch)).permutation(len(self.examples))
            self._order = (key, order)
        return self._order[1]

    def batch(self, seed: int, step: int, global_batch: int, rank: int, world: int,
              group_by_length: bool = False) -> list[Example]:
        """This process's share of the global batch of optimizer step `step` (0-based).

        An epoch is `len // global_batch` steps (the incomplete tail is dropped; reshuffling moves different
        samples into it each epoch); process `rank` takes every `world`-th example of the global batch.
        """
        per_epoch = len(self.examples) // global_batch
        epoch, position = divmod(step, per_epoch)
        order = self.order(seed, epoch, global_batch if group_by_length else 0)
        indices = order[position * global_batch:(position + 1) * global_batch]
        return [self.examples[i] for i in indices[rank::world]]


def _without(text: str, placeholders: Sequence[str]) -> str:
    for placeholder in placeholders:
        text = text.replace(placeholder, "")
    return text
