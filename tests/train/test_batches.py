"""Batch order: a permutation per (seed, epoch), and length grouping that cuts padding."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mmcompose.train.data import ExampleSet
from mmcompose.train.trainer import build_model
from tests.train.conftest import samples, tiny_spec


def test_length_grouping_is_a_seeded_permutation_with_less_padding(llama_base: Path, world: Path) -> None:
    model = build_model(llama_base, [tiny_spec("image")], strategy="decoupled", rank=2, seed=0)
    data = ExampleSet(model, samples(world, "image_instruct"), world)
    one = next(i for i, e in enumerate(data.examples) if len(e.inputs["image"]) == 1)
    four = next(i for i, e in enumerate(data.examples) if len(e.inputs["image"]) == 4)
    found = [data.lengths[i] - model.assemble([data.examples[i]]).attention_mask.sum().item() for i in (one, four)]
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
    assert [e.id for e in data.batch(0, 3, size, 0, 1, group_by_length=True)] == \
        [data.examples[i].id for i in grouped[3 * size: 4 * size]]
