"""Batch order: a permutation per (seed, epoch), and length grouping that cuts padding."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mmcompose.data.dataset import SampleDataset, load_training_samples
from mmcompose.data.samples import StoredSamples, load_files
from mmcompose.model.assembly import Example
from mmcompose.train.trainer import build_model
from tests.train.conftest import tiny_spec


def test_length_grouping_is_a_seeded_permutation_with_less_padding(llama_base: Path, world: Path) -> None:
    model = build_model(llama_base, [tiny_spec("image")], strategy="decoupled", rank=2, seed=0)
    samples = load_training_samples([world / "data" / "image_instruct.json"], world, model).samples
    data = SampleDataset(model, samples)
    one = next(i for i, s in enumerate(data.samples) if len(s.modal_inputs["image"]) == 1)
    four = next(i for i, s in enumerate(data.samples) if len(s.modal_inputs["image"]) == 4)
    found = [data.lengths[i] - model.assemble([data[i]]).attention_mask.sum().item() for i in (one, four)]
    assert found[0] == found[1] and abs(found[0]) <= 2  # exact up to the special tokens
    assert len(set(data.lengths)) > 3  # one- to four-input questions: lengths to group

    size, lengths = 16, np.array(data.lengths)
    grouped, plain = data.order(0, 0, size), data.order(0, 0)
    assert sorted(grouped) == sorted(plain) == list(range(len(data)))
    assert np.array_equal(data.order(0, 0, size), grouped) and not np.array_equal(data.order(0, 1, size), grouped)

    def padding(order: np.ndarray) -> int:
        batches = lengths[order[: len(order) // size * size]].reshape(-1, size)
        return int((batches.max(axis=1, keepdims=True) - batches).sum())

    assert padding(grouped) < padding(plain) / 2
    assert data.batch_indices(0, 3, size, 0, 1, group_by_length=True) == list(grouped[3 * size: 4 * size])


def test_streamed_data_gives_the_eager_batches_and_examples(llama_base: Path, world: Path) -> None:
    """The streamed loader (offsets in the file, records parsed again per item) against the eager one (every
    `Sample` in a list) on the world's data: the same samples, lengths, skipped lines, batches and examples."""
    model = build_model(llama_base, [tiny_spec("image")], strategy="decoupled", rank=2, seed=0)
    files = [world / "data" / "image_instruct.json"]
    streamed = load_training_samples(files, world, model).samples
    eager = load_files(files, world, purpose="train", modalities=list(model.processors),
                       placeholders={m.name: m.placeholder for m in model.spec.modalities}).samples
    assert isinstance(streamed, StoredSamples) and isinstance(eager, list)
    assert list(streamed) == eager and streamed[-1] == eager[-1]
    rendered = [model.render_conversation(sample.conversations) for sample in eager]
    tokens = [model.assembler.sequence_length(Example(r.prompt, target=r.target), {"image": 1}) for r in rendered]
    limit = sorted(tokens)[-5]  # max_length counts an input as one token; a few samples are too long for it
    lazy, full = SampleDataset(model, streamed, max_length=limit), SampleDataset(model, eager, max_length=limit)
    assert full.too_long and [str(b) for b in lazy.too_long] == [str(b) for b in full.too_long]
    assert list(lazy.samples) == list(full.samples) and list(lazy.lengths) == list(full.lengths)
    assert (lazy.modalities, lazy.has_text_only, lazy.positions) == (full.modalities, full.has_text_only,
                                                                     full.positions)
    for group in (False, True):
        assert [lazy.batch_indices(7, step, 8, 0, 1, group) for step in range(12)] == \
               [full.batch_indices(7, step, 8, 0, 1, group) for step in range(12)]
    for index in lazy.batch_indices(7, 3, 8, 0, 1, True):
        mine, theirs = lazy[index], full[index]
        assert (mine.prompt, mine.target, mine.id) == (theirs.prompt, theirs.target, theirs.id)
        assert all(torch.equal(a, b) for m in theirs.inputs for a, b in zip(mine.inputs[m], theirs.inputs[m],
                                                                           strict=True))
