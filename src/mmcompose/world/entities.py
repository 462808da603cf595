"""Entities of the synthetic world: names, attributes and per-modality latent codes.

The world is what the whole default experiment is about: the base LLM learns each entity's attributes from
text, and every modality renders an entity from its *own* latent code, so an encoder learns identity from its
modality alone while the attributes stay knowledge that only the LLM holds.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from mmcompose.data.names import WORLD_MODALITIES
from mmcompose.errors import MMComposeError

MODALITIES: tuple[str, ...] = WORLD_MODALITIES
"""The four modalities of the world, in the order MCUB inputs are listed."""

LATENT_DIM = 16
"""Length of each entity's latent code per modality (uniform floats in [0, 1))."""

ATTRIBUTE_SCHEMA: dict[str, tuple[str, ...]] = {
    "category": ("bird", "fish", "insect", "reptile", "mammal", "amphibian"),
    "habitat": ("desert", "forest", "ocean", "mountain", "swamp", "cave"),
    "colour": ("red", "blue", "green", "yellow", "purple", "orange"),
    "size": ("tiny", "small", "medium", "big", "large", "huge"),
    "diet": ("grass", "meat", "fruit", "seeds", "nectar", "leaves"),
}
"""Every attribute and its possible values. Values are distinct words across attributes, so a bare value is
an unambiguous answer option. A world uses the first few values of each attribute (see `values_per_attribute`)."""

MIN_VALUES, MAX_VALUES = 4, 6
ENTITIES_PER_VALUE = 8

_ONSETS = (
    "b",
    "bl",
    "br",
    "d",
    "dr",
    "f",
    "fl",
    "g",
    "gl",
    "gr",
    "k",
    "kl",
    "kr",
    "m",
    "n",
    "p",
    "pl",
    "pr",
    "sk",
    "sl",
    "sn",
    "st",
    "t",
    "tr",
    "v",
    "z",
)
_MIDDLE_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "t", "v", "z")
_VOWELS = ("a", "e", "i", "o", "u")
_INNER_CODAS = ("", "", "r", "l", "n", "m")
_FINAL_CODAS = ("n", "l", "r", "k", "m", "p", "t", "g", "d", "b")


def stream(seed: int, *keys: int | str) -> np.random.Generator:
    """An independent, reproducible random stream for `seed` and a path of keys (never the global RNG).

    Strings are mapped to integers with CRC32, which (unlike `hash`) is stable across processes.
    """
    words = [int(seed) & 0xFFFFFFFF]
    for key in keys:
        words.append(zlib.crc32(key.encode()) if isinstance(key, str) else int(key) & 0xFFFFFFFF)
    return np.random.default_rng(np.random.SeedSequence(words))


@dataclass(frozen=True)
class Entity:
    """One made-up creature: a single-word name, one value per attribute, one latent code per modality.

    `latents[m]` drives only modality `m`'s renderer; the codes are drawn independently of each other and of
    the attributes, so no modality (and no medium) reveals another's code or the entity's attributes.
    """

    name: str
    attributes: dict[str, str]
    latents: dict[str, tuple[float, ...]]


@dataclass(frozen=True)
class World:
    """A seed's entities and the attribute values in use (`attributes[a]` lists the values of attribute `a`)."""

    seed: int
    entities: tuple[Entity, ...]
    attributes: dict[str, list[str]]

    def entity(self, name: str) -> Entity:
        """The entity called `name`."""
        for entity in self.entities:
            if entity.name == name:
                return entity
        raise MMComposeError(f"the world of seed {self.seed} has no entity named {name!r}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready description (the inverse of `World.from_dict`)."""
        return {
            "seed": self.seed,
            "attributes": {a: list(v) for a, v in self.attributes.items()},
            "entities": [
                {
                    "name": e.name,
                    "attributes": dict(e.attributes),
                    "latents": {m: list(code) for m, code in e.latents.items()},
                }
                for e in self.entities
            ],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> World:
        """Rebuild a world from `to_dict` output (e.g. the `world.json` of a built world)."""
        try:
            entities = tuple(
                Entity(
                    name=str(e["name"]),
                    attributes={str(a): str(v) for a, v in e["attributes"].items()},
                    latents={str(m): tuple(float(x) for x in code) for m, code in e["latents"].items()},
                )
                for e in data["entities"]
            )
            attributes = {str(a): [str(v) for v in values] for a, values in data["attributes"].items()}
            return cls(seed=int(data["seed"]), entities=entities, attributes=attributes)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise MMComposeError(f"malformed world description: {exc!r}") from exc


def values_per_attribute(num_entities: int) -> int:
    """How many values each attribute uses: about `ENTITIES_PER_VALUE` entities share each value.

    Large groups of entities with a common value are what makes 3- and 4-entity sets sharing exactly one
    offered value (the MCUB items) abundant.
    """
    return int(np.clip(num_entities // ENTITIES_PER_VALUE, MIN_VALUES, MAX_VALUES))


def _make_names(rng: np.random.Generator, count: int, forbidden: Iterable[str]) -> list[str]:
    """`count` distinct pronounceable two-syllable lowercase names (consonant first, never ending in s/x/y/z)."""
    taken = set(forbidden)
    names: list[str] = []
    while len(names) < count:
        name = (
            str(rng.choice(_ONSETS))
            + str(rng.choice(_VOWELS))
            + str(rng.choice(_INNER_CODAS))
            + str(rng.choice(_MIDDLE_ONSETS))
            + str(rng.choice(_VOWELS))
            + str(rng.choice(_FINAL_CODAS))
        )
        if name not in taken and 5 <= len(name) <= 8:
            taken.add(name)
            names.append(name)
    return names


def _assign_attributes(rng: np.random.Generator, num_entities: int, num_values: int) -> np.ndarray:
    """A (num_entities, num_attributes) table of value indices: each attribute balanced (every value used
    equally often), attributes independent of each other, and no two entities with identical attributes."""
    num_attributes = len(ATTRIBUTE_SCHEMA)
    if num_entities > num_values**num_attributes:
        raise MMComposeError(f"cannot give {num_entities} entities distinct attributes with {num_values} values")
    base = np.arange(num_entities) % num_values
    for _ in range(1000):
        table = np.stack([rng.permutation(base) for _ in range(num_attributes)], axis=1)
        if len({tuple(row) for row in table.tolist()}) == num_entities:
            return table
    raise MMComposeError(f"could not draw distinct attributes for {num_entities} entities; use fewer entities")


def make_world(seed: int, num_entities: int) -> World:
    """Draw a world of `num_entities` entities, deterministically from `seed`.

    Names, the attribute table and each latent code come from separate random streams, so the latents are
    independent of the attributes and of each other.
    """
    if num_entities < 8:
        raise MMComposeError(f"a world needs at least 8 entities, got {num_entities}")
    num_values = values_per_attribute(num_entities)
    attributes = {a: list(values[:num_values]) for a, values in ATTRIBUTE_SCHEMA.items()}
    vocabulary = {v for values in ATTRIBUTE_SCHEMA.values() for v in values} | set(ATTRIBUTE_SCHEMA)
    names = _make_names(stream(seed, "names"), num_entities, vocabulary)
    table = _assign_attributes(stream(seed, "attributes"), num_entities, num_values)
    entities = []
    for index, name in enumerate(names):
        latents = {m: tuple(float(x) for x in stream(seed, "latent", m, index).random(LATENT_DIM)) for m in MODALITIES}
        values = {a: attributes[a][int(table[index, j])] for j, a in enumerate(attributes)}
        entities.append(Entity(name=name, attributes=values, latents=latents))
    return World(seed=int(seed), entities=tuple(entities), attributes=attributes)
