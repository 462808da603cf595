"""The world's entities: determinism, names, attribute table, and what the latent codes may not reveal."""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
import pytest

from mmcompose.errors import MMComposeError
from mmcompose.world import ATTRIBUTE_SCHEMA, MODALITIES, World, make_world
from mmcompose.world.entities import LATENT_DIM, values_per_attribute


def test_same_seed_same_world_different_seed_different_world() -> None:
    assert make_world(3, 24).to_dict() == make_world(3, 24).to_dict()
    first, other = make_world(3, 24), make_world(4, 24)
    assert [e.name for e in first.entities] != [e.name for e in other.entities]
    assert first.entities[0].latents != other.entities[0].latents


def test_dict_round_trip() -> None:
    world = make_world(5, 40)
    assert World.from_dict(world.to_dict()) == world


@pytest.mark.parametrize("num_entities", [16, 24, 48])
def test_names_and_attributes(num_entities: int) -> None:
    world = make_world(11, num_entities)
    names = [e.name for e in world.entities]
    assert len(set(names)) == num_entities
    assert all(re.fullmatch(r"[a-z]{5,8}", n) and n[0] not in "aeiou" and n[-1] not in "sxyz" for n in names)
    vocabulary = {v for values in ATTRIBUTE_SCHEMA.values() for v in values}
    assert not vocabulary & set(names)
    count = values_per_attribute(num_entities)
    assert 4 <= count <= 6
    assert world.attributes == {a: list(v[:count]) for a, v in ATTRIBUTE_SCHEMA.items()}
    for attribute, values in world.attributes.items():
        usage = Counter(e.attributes[attribute] for e in world.entities)
        assert set(usage) == set(values)
        assert max(usage.values()) - min(usage.values()) <= 1
    assert len({tuple(e.attributes.values()) for e in world.entities}) == num_entities
    for entity in world.entities:
        assert set(entity.latents) == set(MODALITIES)
        assert all(len(code) == LATENT_DIM and all(0.0 <= x < 1.0 for x in code) for code in entity.latents.values())


def test_latents_are_independent_across_modalities_and_of_attributes() -> None:
    world = make_world(2, 48)
    codes = {m: np.array([e.latents[m] for e in world.entities]) for m in MODALITIES}
    for i, a in enumerate(MODALITIES):
        for b in MODALITIES[i + 1 :]:
            cross = np.corrcoef(codes[a].T, codes[b].T)[:LATENT_DIM, LATENT_DIM:]
            assert np.abs(cross).max() < 0.5
    colour = np.array([world.attributes["colour"].index(e.attributes["colour"]) for e in world.entities])
    assert np.abs(np.corrcoef(codes["image"].T, colour)[-1, :-1]).max() < 0.5


def test_lookup_and_errors() -> None:
    world = make_world(1, 16)
    assert world.entity(world.entities[3].name) is world.entities[3]
    with pytest.raises(MMComposeError):
        world.entity("nobody")
    with pytest.raises(MMComposeError):
        make_world(1, 4)
    with pytest.raises(MMComposeError):
        World.from_dict({"seed": 1})
