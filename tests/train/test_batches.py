"""Batch order: a permutation per (seed, epoch), and length grouping that cuts padding."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mmcompose.data.dataset import SampleDataset, load_training_samples
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
