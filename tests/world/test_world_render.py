"""Renderers: shapes and ranges, identity learnable within a modality, modalities not copies of each other,
attributes not readable from the media."""

from __future__ import annotations

import numpy as np
import pytest

from mmcompose.world import MODALITIES, make_world
from mmcompose.world.entities import stream
from mmcompose.world.render import RENDERERS

SHAPES = {
    "image": ((32, 32, 3), np.uint8),
    "audio": ((16000,), np.float32),
    "video": ((8, 32, 32, 3), np.uint8),
    "point": ((512, 3), np.float32),
}
TRAIN, TEST = range(0, 6), range(6, 9)


def features(modality: str, x: np.ndarray) -> np.ndarray:
    """Fixed, simple features (no learning): enough to show the signal is there for a tiny encoder."""
    if modality == "image":
        return x.reshape(-1).astype(np.float64) / 255.0
    if modality == "video":
        return x.astype(np.float64).mean(axis=0).reshape(-1) / 255.0
    if modality == "audio":
        return np.log1p(np.abs(np.fft.rfft(x))[:8000].reshape(250, -1).mean(axis=1))
    radius = np.hypot(x[:, 0], x[:, 1])
    return np.concatenate([np.histogram(x[:, 2], 16, (-1.2, 1.2))[0], np.histogram(radius, 16, (0.0, 1.2))[0]]) / 512


@pytest.fixture(scope="module")
def rendered() -> dict[str, np.ndarray]:
    """Features of renderings (entity, rendering index, feature) of a 24-entity world, per modality."""
    world = make_world(21, 24)
    return {
        m: np.array(
            [
                [features(m, RENDERERS[m](e, stream(21, m, i, k))) for k in (*TRAIN, *TEST)]
                for i, e in enumerate(world.entities)
            ]
        )
        for m in MODALITIES
    }


@pytest.mark.parametrize("modality", MODALITIES)
def test_shapes_ranges_and_determinism(modality: str) -> None:
    entity = make_world(0, 16).entities[0]
    shape, dtype = SHAPES[modality]
    first = RENDERERS[modality](entity, np.random.default_rng(1))
    assert first.shape == shape and first.dtype == dtype
    assert np.array_equal(first, RENDERERS[modality](entity, np.random.default_rng(1)))
    assert not np.array_equal(first, RENDERERS[modality](entity, np.random.default_rng(2)))
    if modality == "audio":
        assert np.abs(first).max() <= 1.0


@pytest.mark.parametrize("modality", MODALITIES)
def test_identity_is_learnable_within_a_modality(rendered: dict[str, np.ndarray], modality: str) -> None:
    """Nearest centroid of training renderings names the entity of held-out renderings far above chance."""
    x = rendered[modality]
    centroids = x[:, : len(TRAIN)].mean(axis=1)
    held_out = x[:, len(TRAIN) :]
    distances = ((held_out[:, :, None, :] - centroids[None, None]) ** 2).sum(axis=-1)
    accuracy = (distances.argmin(axis=-1) == np.arange(len(x))[:, None]).mean()
    assert accuracy > 0.5  # chance is 1/24


def _pair_distances(x: np.ndarray) -> np.ndarray:
    upper = np.triu_indices(len(x), k=1)
    return np.sqrt(((x[:, None] - x[None]) ** 2).sum(axis=-1))[upper]


def test_modalities_are_not_copies_and_hide_attributes(rendered: dict[str, np.ndarray]) -> None:
    """Which entities look alike in one modality says nothing about which look alike in another, nor about
    which share attributes (correlation of pairwise-distance matrices near zero)."""
    world = make_world(21, 24)
    geometry = {m: _pair_distances(x.mean(axis=1)) for m, x in rendered.items()}
    table = [list(e.attributes.values()) for e in world.entities]
    attribute_distance = np.array(
        [
            sum(a != b for a, b in zip(table[i], table[j], strict=True))
            for i in range(len(table))
            for j in range(i + 1, len(table))
        ],
        dtype=np.float64,
    )
    assert attribute_distance.shape == geometry["image"].shape
    for i, a in enumerate(MODALITIES):
        assert abs(np.corrcoef(geometry[a], attribute_distance)[0, 1]) < 0.3
        for b in MODALITIES[i + 1 :]:
            assert abs(np.corrcoef(geometry[a], geometry[b])[0, 1]) < 0.3
