"""Lazy training data: validated samples -> a `torch.utils.data.Dataset` whose media are decoded on indexing.

The data set holds only text and paths; media are processed when an item is fetched, by DataLoader workers
when `num_workers > 0`, so memory does not grow with the data file. Everything the sampler needs is known
without decoding: text lengths from the tokenizer, and one number of LLM positions per modality (the
assembler stacks all inputs of a modality into one tensor, so a modality's processed inputs share one
shape and take the same number of positions; it is measured on the first medium of each modality).

Batch order is a pure function of (seed, epoch), so a resumed run sees exactly the batches an uninterrupted
one would, and every process of a distributed run computes the same order.

Maximum length: a sample is never truncated. `max_length` counts tokens as the official trainers' tokenizer
does (`model_max_length`): special tokens and text, each input one token, before its features are put in;
so 8 video frames of 257 positions each train under `max_length: 2048`, as they do in ModelCompose. A sample
over `max_length`, or whose full sequence (every modality span included) is longer than the LLM's
`max_position_embeddings`, is skipped and counted, because a cut would either split a modality span, drop
the question, or teach an answer that stops mid-sentence without its end token.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from itertools import islice
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch.utils.data import DataLoader, Dataset, Sampler
from transformers.trainer_pt_utils import get_length_grouped_indices

from mmcompose.data.cache import FeatureCache
from mmcompose.data.samples import BadSample, Sample, SampleSet, StoredSamples, stream_samples, validate_records
from mmcompose.errors import InputError
from mmcompose.model.assembly import Example
from mmcompose.model.conversation import Formatted
from mmcompose.model.mllm import MultimodalLLM


class DataOptions(BaseModel):
    """How training reads its data (a `TrainConfig`'s `data` field)."""

    model_config = ConfigDict(extra="forbid")
    on_bad_sample: Literal["stop", "skip"] = Field(
        "stop", description="stop: any invalid sample is an error before training; skip: leave it out, counted")
    max_length: int | None = Field(None, gt=0, description="longest sample in tokens, each input counted as one "
                                                           "(as the official tokenizer's model_max_length); longer "
                                                           "samples are skipped and counted")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes decoding media (0: in the "
                                                  "training process)")
    cache_features: Path | None = Field(None, description="directory of cached frozen-encoder features")

    def updated(self, **flags: Any) -> DataOptions:
        """These options with the given (non-None) values on top, validated: command-line flags over a config."""
        try:
            return DataOptions.model_validate(self.model_dump() | {k: v for k, v in flags.items() if v is not None})
        except ValidationError as error:
            first = error.errors()[0]
            raise InputError(f"--{str(first['loc'][0]).replace('_', '-')}: {first['msg']}") from None


def load_training_samples(files: Sequence[str | Path], data_root: str | Path, model: MultimodalLLM,
                          on_bad_sample: Literal["stop", "skip"] = "stop") -> SampleSet:
    """Validate every training file for `model` (its modalities and placeholders) before anything trains.

    The files are streamed: the samples are a :class:`StoredSamples`, whose memory does not grow with their
    text (each record is parsed again when its item is fetched)."""
    return stream_samples(files, data_root, purpose="train", modalities=list(model.processors),
                          placeholders={m.name: m.placeholder for m in model.spec.modalities},
                          on_bad_sample=on_bad_sample)


def training_samples(samples: Sequence[Sample | dict[str, Any]], data_root: str | Path, model: MultimodalLLM,
                     on_bad_sample: Literal["stop", "skip"] = "stop") -> SampleSet:
    """`samples` as validated training samples: `Sample`s (or a :class:`StoredSamples`) are taken as they are
    (their media paths already resolved), raw records are validated like a file's, with media under
    `data_root`."""
    if isinstance(samples, StoredSamples):
        return SampleSet(samples=samples)
    if all(isinstance(s, Sample) for s in samples):
        return SampleSet(samples=list(samples))  # type: ignore[arg-type]
    return validate_records(list(samples), "training samples", data_root, purpose="train",
                            modalities=list(model.processors),
                            placeholders={m.name: m.placeholder for m in model.spec.modalities},
                            on_bad_sample=on_bad_sample)


def modality_counts(samples: Sequence[Sample]) -> dict[str, np.ndarray]:
    """Per modality, each sample's number of inputs of it (a :class:`StoredSamples` has them stored)."""
    if isinstance(samples, StoredSamples):
        return samples.counts
    names = sorted({m for sample in samples for m in sample.modal_inputs})
    return {m: np.array([len(s.modal_inputs.get(m, ())) for s in samples], dtype=np.int64) for m in names}


class SampleDataset(Dataset[Example]):
    """Training samples as `Example`s in the model's template; item `i` decodes sample `i`'s media.

    `lengths` (for length grouping) are each sample's text tokens without placeholders plus the positions
    of its inputs, up to a constant (special tokens); `too_long` lists the samples left out by the
    maximum length, as :class:`BadSample` lines. Memory: besides `samples` (a :class:`StoredSamples` keeps no
    text), numpy arrays of a few numbers per sample; the texts are formatted and tokenized
    `CHUNK` samples at a time.
    """

    CHUNK = 2048

    def __init__(self, model: MultimodalLLM, samples: Sequence[Sample], *, max_length: int | None = None,
                 source: str = "training data") -> None:
        if not samples:
            raise InputError(f"{source}: no training samples")
        self.processors = dict(model.processors)
        self.format = model.render_conversation
        placeholders = [spec.placeholder for spec in model.spec.modalities]
        counts = modality_counts(samples)
        present = sorted(m for m, column in counts.items() if column.any())
        first = {m: samples[int(np.argmax(counts[m] > 0))].modal_inputs[m][0] for m in present}
        self.positions = {m: model.input_length(m, self.processors[m](first[m])) for m in present}
        positions_limit = model.assembler.max_length
        full = np.zeros(len(samples), dtype=np.int64)  # whole sequence, for the LLM's positions
        short = np.zeros(len(samples), dtype=np.int64)  # each input one token, for `max_length`
        tokens = np.zeros(len(samples), dtype=np.int64)  # text without placeholders, for the lengths
        self.too_long: list[BadSample] = []
        stream = iter(samples)
        for start in range(0, len(samples), self.CHUNK):
            block = list(islice(stream, self.CHUNK))
            formatted = [self.format(sample.conversations) for sample in block]
            end = start + len(block)
            full[start:end] = model.assembler.sequence_lengths([_example(f) for f in formatted], self.positions)
            texts = [_without(f.prompt, placeholders) + (f.target or "") for f in formatted]
            tokens[start:end] = [len(ids) for ids in model.tokenizer(texts, add_special_tokens=False,
                                                                     return_attention_mask=False)["input_ids"]]
            short[start:end] = full[start:end] - sum(
                ((self.positions[m] - 1) * counts[m][start:end] for m in present), np.zeros(end - start, np.int64))
            over = (full[start:end] > positions_limit) | (short[start:end] > (max_length or positions_limit))
            for offset in np.flatnonzero(over).tolist():
                sample, length, text = block[offset], int(full[start + offset]), int(short[start + offset])
                file, position = sample.origin or (source, start + offset)
                inputs = {m: len(paths) for m, paths in sample.modal_inputs.items()}
                reason = (f"{length} positions exceed the LLM's {positions_limit}" if length > positions_limit else
                          f"{text} tokens exceed the maximum length {max_length}")
                self.too_long.append(BadSample(file, position, "", f"{reason} ({inputs or 'text only'}); skipped",
                                               sample.id))
        kept = np.flatnonzero((full <= positions_limit) & (short <= (max_length or positions_limit)))
        if not len(kept):
            raise InputError(f"{source}: all {len(samples)} samples are too long (first: {self.too_long[0]})")
        if len(kept) == len(samples):
            self.samples: Sequence[Sample] = samples
        elif isinstance(samples, StoredSamples):
            self.samples = samples.subset(kept)
        else:
            self.samples = [samples[i] for i in kept.tolist()]
        kept_counts = {m: counts[m][kept] for m in present}
        self.modalities = [m for m in present if kept_counts[m].any()]
        inputs = sum(kept_counts.values(), np.zeros(len(kept), dtype=np.int64))
        self.has_text_only = bool((inputs == 0).any())
        self.lengths = tokens[kept] + sum((self.positions[m] * kept_counts[m] for m in present),
                                          np.zeros(len(kept), dtype=np.int64))
        self.caches: dict[str, FeatureCache] = {}
        self._digests: dict[str, dict[Path, str]] = {}
        self._decoded: dict[tuple[str, Path], torch.Tensor] = {}
        self._decoded_room = 0
        self._order: tuple[tuple[int, int, int] | None, np.ndarray] = (None, np.empty(0, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Example:
        sample = self.samples[index]
        inputs = {m: [self._input(m, path) for path in paths] for m, paths in sample.modal_inputs.items()}
        return _example(self.format(sample.conversations), inputs, sample.id)

    def _input(self, modality: str, path: Path) -> torch.Tensor:
        if modality in self.caches:
            return self.caches[modality].load(self._digests[modality][path])
        kept = self._decoded.get((modality, path))
        if kept is not None:
            return kept
        value = self.processors[modality](path)
        if value.nbytes <= self._decoded_room:
            self._decoded[modality, path] = value
            self._decoded_room -= value.nbytes
        return value

    def keep_decoded(self, budget: int) -> None:
        """Keep decoded inputs in memory, the first `budget` bytes of them (per process: each DataLoader worker
        keeps its own), for runs in which items come back. Decoding is what a small model's step waits on:
        one of the demo's 8-frame MP4s takes ~29 ms to decode and ~3 ms to encode. The processors are
        deterministic, so a kept input is the one decoding would give again."""
        self._decoded_room = budget - sum(value.nbytes for value in self._decoded.values())

    @property
    def encoded(self) -> tuple[str, ...]:
        """The modalities whose items are cached encoder outputs (pass to `MultimodalLLM.assemble(encoded=)`)."""
        return tuple(self.caches)

    def cache_features(self, model: MultimodalLLM, directory: Path) -> dict[str, dict[str, int]]:
        """Serve every modality's inputs from the feature cache in `directory`, encoding the files not cached
        yet with the model's (frozen) encoders. Returns per modality the files found and computed."""
        report = {}
        for modality in self.modalities:
            files = list(dict.fromkeys(p for s in self.samples for p in s.modal_inputs.get(modality, [])))
            spec = next(m for m in model.spec.modalities if m.name == modality)
            cache, digests = FeatureCache.prepare(directory, spec, model.branches[modality].encoder,
                                                  self.processors[modality], files)
            self.caches[modality] = cache
            self._digests[modality] = dict(zip(files, digests, strict=True))
            report[modality] = {"cached": cache.hits, "computed": cache.computed}
        return report

    def order(self, seed: int, epoch: int, group: int = 0) -> np.ndarray:
        """The permutation of sample indices for `epoch`: the same for every process and every resume.

        With `group` (the global batch size), each run of `group` consecutive indices holds samples of similar
        length (transformers' length grouping, as LLaVA's `group_by_modality_length`): a batch that mixes
        one-input and four-input questions pads the short ones to the long one, measured as half the tokens of
        a batch.
        """
        key = (seed, epoch, group)
        if self._order[0] != key:  # computed once per epoch, not once per step
            if group:
                state = int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])
                generator = torch.Generator().manual_seed(state)
                order = np.array(get_length_grouped_indices(self.lengths.tolist(), group, generator=generator))
            else:
                order = np.random.default_rng((seed, epoch)).permutation(len(self.samples))
            self._order = (key, order)
        return self._order[1]

    def batch_indices(self, seed: int, step: int, global_batch: int, rank: int, world: int,
                      group_by_length: bool = False) -> list[int]:
        """This process's share of the global batch of optimizer step `step` (0-based).

        An epoch is `len // global_batch` steps (the incomplete tail is dropped; reshuffling moves different
        samples into it each epoch); process `rank` takes every `world`-th index of the global batch.
        """
        per_epoch = len(self.samples) // global_batch
        epoch, position = divmod(step, per_epoch)
        order = self.order(seed, epoch, global_batch if group_by_length else 0)
        return [int(i) for i in order[position * global_batch:(position + 1) * global_batch][rank::world]]


class StepBatches(Sampler[list[int]]):
    """The batches of optimizer steps `start .. total-1` for one process, in order (a DataLoader batch sampler)."""

    def __init__(self, data: SampleDataset, *, seed: int, global_batch: int, rank: int, world: int,
                 group_by_length: bool, start: int, total: int) -> None:
        self.data, self.seed, self.global_batch, self.rank, self.world = data, seed, global_batch, rank, world
        self.group_by_length, self.start, self.total = group_by_length, start, total

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start, self.total):
            yield self.data.batch_indices(self.seed, step, self.global_batch, self.rank, self.world,
                                          self.group_by_length)

    def __len__(self) -> int:
        return self.total - self.start


def _as_list(examples: list[Example]) -> list[Example]:
    return examples


def step_loader(data: SampleDataset, batches: StepBatches, num_workers: int = 0) -> DataLoader:
    """A DataLoader yielding each step's `list[Example]`, decoded by `num_workers` worker processes.

    Its own generator keeps the global torch RNG untouched (the DataLoader draws a base seed from it). It is
    not given to accelerate's `prepare`: the batch sampler already takes this process's share of each global
    batch, in the order an exact resume needs."""
    return DataLoader(data, batch_sampler=batches, num_workers=num_workers, collate_fn=_as_list,
                      generator=torch.Generator().manual_seed(batches.seed))


def _example(formatted: Formatted, inputs: dict[str, list[torch.Tensor]] | None = None, id: str = "") -> Example:
    return Example(prompt=formatted.prompt, inputs=inputs or {}, target=formatted.target, id=id,
                   answers=formatted.answers, eos=formatted.eos)


def _without(text: str, placeholders: Sequence[str]) -> str:
    for placeholder in placeholders:
        text = text.replace(placeholder, "")
    return text
