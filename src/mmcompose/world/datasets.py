"""Samples of every data set built from a world, in the benchmark JSON layout.

A sample is `{"id", "conversations": [{"from": "human", ...}, {"from": "gpt", ...}], "modal_inputs", "meta"}`;
`meta` (task, entities in input order, and the asked attribute and value) is there for analysis only.

Common-attribute (MCUB-style) items are built so that a model must see *every* input: exactly one option is
shared by all the entities, and the three distractors are values that some but not all of them have, chosen so
that each entity on its own is consistent with the answer and at least one distractor (usually two).
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mmcompose.errors import MMComposeError
from mmcompose.world import templates as tpl
from mmcompose.world.entities import Entity, World
from mmcompose.world.render import MEDIA_EXTENSIONS

Sample = dict[str, Any]


def media_path(modality: str, name: str, index: int) -> str:
    """Path, relative to the world directory, of rendering number `index` of entity `name`."""
    return f"media/{modality}/{name}_{index}.{MEDIA_EXTENSIONS[modality]}"


def make_sample(
    sample_id: str, human: str, gpt: str, modal_inputs: dict[str, list[str]], meta: dict[str, Any]
) -> Sample:
    """One sample in the benchmark layout."""
    return {
        "id": sample_id,
        "conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": gpt}],
        "modal_inputs": modal_inputs,
        "meta": meta,
    }


def balanced_positions(count: int, rng: np.random.Generator) -> list[int]:
    """Answer positions for `count` multiple-choice items, each letter used equally often, in random order."""
    return [int(p) for p in rng.permutation(np.arange(count) % len(tpl.LETTERS))]


def choice_options(correct: str, pool: Sequence[str], position: int, rng: np.random.Generator) -> list[str]:
    """Four options: `correct` at `position`, three distinct others drawn from `pool`."""
    others = [x for x in pool if x != correct]
    options = [str(x) for x in rng.choice(others, size=len(tpl.LETTERS) - 1, replace=False)]
    options.insert(position, correct)
    return options


def assign_ids(samples: list[Sample], prefix: str, rng: np.random.Generator) -> list[Sample]:
    """Shuffle the samples (so any prefix of a file covers all entities) and number them `prefix-00000`..."""
    order = rng.permutation(len(samples))
    shuffled = [samples[i] for i in order]
    for i, sample in enumerate(shuffled):
        sample["id"] = f"{prefix}-{i:05d}"
    return shuffled


# ---------------------------------------------------------------- single-entity questions


@dataclass(frozen=True)
class Choice:
    """A multiple-choice question about one entity: the full question text and its answer, both as the
    option's letter (how held-out test files are scored, as in MCUB) and as the option's text (how training
    data answers: a small model learns to name the right option long before it learns to map it to a letter)."""

    question: str
    options: tuple[str, ...]
    answer: int

    @property
    def letter(self) -> str:
        return tpl.LETTERS[self.answer]

    @property
    def text(self) -> str:
        return self.options[self.answer]


def identity_choice(world: World, name: str, position: int, rng: np.random.Generator) -> Choice:
    """Which entity is this, with `name` at `position`."""
    options = choice_options(name, [e.name for e in world.entities], position, rng)
    return Choice(tpl.multiple_choice(tpl.IDENTITY_QUESTION, options), tuple(options), position)


def attribute_choice(world: World, name: str, attribute: str, position: int, rng: np.random.Generator) -> Choice:
    """One attribute of entity `name`, the right value at `position`."""
    value = world.entity(name).attributes[attribute]
    options = choice_options(value, world.attributes[attribute], position, rng)
    return Choice(tpl.multiple_choice(tpl.ATTRIBUTE_QUESTIONS[attribute], options), tuple(options), position)


def caption_samples(world: World, modality: str, renders: range, rng: np.random.Generator) -> list[Sample]:
    """Stage-1 alignment data: the placeholder alone, answered by the caption `This is a <name>.`."""
    samples = [
        make_sample(
            "",
            tpl.PLACEHOLDERS[modality],
            tpl.caption(e.name),
            {modality: [media_path(modality, e.name, k)]},
            {"task": "caption", "entities": [e.name]},
        )
        for e in world.entities
        for k in renders
    ]
    return assign_ids(samples, f"{modality}-caption", rng)


def _choice_samples(world: World, modality: str, entity: Entity, k: int, attribute: str, positions: Iterator[int],
                    rng: np.random.Generator, *, letters: bool) -> list[Sample]:
    """The identity and the `attribute` multiple-choice questions about rendering `k` of `entity`, answered
    by the option's letter (`letters`, held-out tests) or its text (training)."""
    inputs = {modality: [media_path(modality, entity.name, k)]}
    placeholder = [tpl.PLACEHOLDERS[modality]]
    identity = identity_choice(world, entity.name, next(positions), rng)
    attribute_question = attribute_choice(world, entity.name, attribute, next(positions), rng)
    value = entity.attributes[attribute]
    return [
        make_sample("", tpl.human_turn(placeholder, choice.question), choice.letter if letters else choice.text,
                    inputs, meta)
        for choice, meta in (
            (identity, {"task": "identity_choice", "entities": [entity.name]}),
            (attribute_question,
             {"task": "attribute_choice", "entities": [entity.name], "attribute": attribute, "value": value}),
        )
    ]


def instruct_samples(world: World, modality: str, renders: range, rng: np.random.Generator) -> list[Sample]:
    """Stage-2 instruction data: per training rendering, the identity question (open and multiple choice)
    and one attribute question (open and multiple choice), the attributes cycling over renderings."""
    attributes = list(world.attributes)
    positions = iter(balanced_positions(2 * len(world.entities) * len(renders), rng))
    samples = []
    for e in world.entities:
        for j, k in enumerate(renders):
            inputs = {modality: [media_path(modality, e.name, k)]}
            placeholder = [tpl.PLACEHOLDERS[modality]]
            open_attribute = attributes[j % len(attributes)]
            value = e.attributes[open_attribute]
            samples += [
                make_sample("", tpl.human_turn(placeholder, tpl.IDENTITY_QUESTION), tpl.caption(e.name), inputs,
                            {"task": "identity", "entities": [e.name]}),
                make_sample("", tpl.human_turn(placeholder, tpl.ATTRIBUTE_QUESTIONS[open_attribute]),
                            tpl.attribute_answer(open_attribute, value), inputs,
                            {"task": "attribute", "entities": [e.name], "attribute": open_attribute, "value": value}),
                *_choice_samples(world, modality, e, k, attributes[(j + 2) % len(attributes)], positions, rng,
                                 letters=False),
            ]
    return assign_ids(samples, f"{modality}-instruct", rng)


def instruct_common_samples(world: World, modality: str, pools: Sequence[Sequence[tuple[int, ...]]], count: int,
                            renders: range, rng: np.random.Generator) -> list[Sample]:
    """Stage-2 multi-input data within one modality: `count` common-attribute questions over 2-4 renderings of
    `modality`, answered with the option's text. Entity sets come from `pools` (one per set size, taken in
    turn), which must hold no set that a test or validation item asks about.

    Real single-modality instruction data has several images (or clips) per question now and then; here it
    is what teaches a modality model to hand several of its inputs to the LLM's reasoning, which the composed
    model then does across modalities it never saw together."""
    usable = [pool for pool in pools if pool]
    samples = []
    for i, position in enumerate(balanced_positions(count, rng)):
        pool = usable[i % len(usable)]
        indices = pool[int(rng.integers(len(pool)))]
        item = common_item(world, [int(j) for j in rng.permutation(indices)], position, rng)
        if item is None:
            continue
        paths = [media_path(modality, name, int(rng.choice(renders))) for name in item.entities]
        human = item.human([tpl.PLACEHOLDERS[modality]] * len(item.entities))
        samples.append(make_sample("", human, item.options[item.answer], {modality: paths},
                                   item.meta("common_choice")))
    return assign_ids(samples, f"{modality}-instruct-common", rng)


def single_test_samples(world: World, modality: str, renders: range, rng: np.random.Generator) -> list[Sample]:
    """Single-modality held-out test: per test rendering, an identity and an attribute multiple choice."""
    attributes = list(world.attributes)
    positions = iter(balanced_positions(2 * len(world.entities) * len(renders), rng))
    samples = []
    for i, e in enumerate(world.entities):
        for j, k in enumerate(renders):
            samples += _choice_samples(world, modality, e, k, attributes[(i + j) % len(attributes)], positions, rng,
                                      letters=True)
    return assign_ids(samples, f"{modality}-test", rng)


def text_qa_samples(world: World, seen: set[str], rng: np.random.Generator, tries: int = 50) -> list[Sample]:
    """Text-only attribute multiple choice (name in place of media) for every entity and attribute, for the
    base LLM's evaluation. Where possible the question text (options and their order) is one that `seen`
    (the corpus' questions) does not contain: the fact is known from the corpus, the item is new."""
    positions = iter(balanced_positions(len(world.entities) * len(world.attributes), rng))
    samples = []
    for e in world.entities:
        for attribute in world.attributes:
            position = next(positions)
            for _ in range(tries):
                choice = attribute_choice(world, e.name, attribute, position, rng)
                human = tpl.human_turn([e.name], choice.question)
                if human not in seen:
                    break
            samples.append(
                make_sample(
                    "",
                    human,
                    choice.letter,
                    {},
                    {
                        "task": "attribute_choice",
                        "entities": [e.name],
                        "attribute": attribute,
                        "value": e.attributes[attribute],
                    },
                )
            )
    return assign_ids(samples, "text-qa", rng)


# ---------------------------------------------------------------- common-attribute (MCUB-style) questions


@dataclass(frozen=True)
class CommonItem:
    """A common-attribute question: entities in input order, four option values, the index of the answer
    (the only option every entity has) and the attribute it belongs to."""

    entities: tuple[str, ...]
    options: tuple[str, ...]
    answer: int
    attribute: str

    def human(self, inputs: Sequence[str]) -> str:
        """The human turn, with `inputs` (placeholders or names) in place of the entities."""
        return tpl.human_turn(inputs, tpl.multiple_choice(tpl.COMMON_QUESTION, self.options))

    def meta(self, task: str) -> dict[str, Any]:
        """Analysis metadata for a sample made of this item."""
        return {
            "task": task,
            "entities": list(self.entities),
            "attribute": self.attribute,
            "value": self.options[self.answer],
        }


def common_sets(world: World, size: int) -> list[tuple[int, ...]]:
    """Every set of `size` entities (sorted index tuples, in a fixed order) that shares some attribute value."""
    found: set[tuple[int, ...]] = set()
    for attribute, values in world.attributes.items():
        for value in values:
            group = [i for i, e in enumerate(world.entities) if e.attributes[attribute] == value]
            found.update(itertools.combinations(group, size))
    return sorted(found)


@functools.cache
def _triples(count: int) -> np.ndarray:
    """All index triples of `count` candidates, as a (C(count, 3), 3) array (cached: built once per count)."""
    return np.array(list(itertools.combinations(range(count), 3)), dtype=np.int64)


def common_item(world: World, indices: Sequence[int], position: int, rng: np.random.Generator) -> CommonItem | None:
    """A question about the entities `indices` (in this input order) with the answer at `position`, or None
    when no three distractors leave every single entity consistent with a wrong option too.

    Distractor candidates are values some but not all entities have; among all triples, the one maximising
    first the least number of distractors any single entity has, then the total, wins (ties broken at random).
    """
    entities = [world.entities[i] for i in indices]
    shared, candidates, holders = [], [], []
    for attribute, values in world.attributes.items():
        held = [e.attributes[attribute] for e in entities]
        present = set(held)
        if len(present) == 1:
            shared.append((attribute, held[0]))
            continue
        for value in values:
            if value in present:
                candidates.append(value)
                holders.append([h == value for h in held])
    if not shared or len(candidates) < 3:
        return None
    attribute, answer = shared[int(rng.integers(len(shared)))]
    masks = np.array(holders, dtype=np.int64)
    triples = _triples(len(candidates))
    coverage = masks[triples].sum(axis=1)
    score = coverage.min(axis=1) * 1000.0 + coverage.sum(axis=1) + rng.random(len(triples))
    best = int(np.argmax(score))
    if coverage[best].min() < 1:
        return None
    distractors = [candidates[j] for j in rng.permutation(triples[best])]
    options = [*distractors[:position], answer, *distractors[position:]]
    return CommonItem(tuple(e.name for e in entities), tuple(options), position, attribute)


def usable_common_sets(world: World, size: int, rng: np.random.Generator) -> list[tuple[int, ...]]:
    """The sets of `size` entities that admit a common-attribute question, in random order."""
    sets = common_sets(world, size)
    usable = [s for s in sets if common_item(world, s, 0, rng) is not None]
    return [usable[i] for i in rng.permutation(len(usable))]


def _interleave_by_attribute(world: World, sets: Sequence[tuple[int, ...]]) -> list[tuple[int, ...]]:
    """`sets` reordered round-robin over the attribute each set shares (its first shared one, in schema
    order), keeping the order within an attribute: any prefix then asks about every attribute about equally."""
    rank: dict[str, int] = {}
    keyed = []
    for position, indices in enumerate(sets):
        attribute = next(a for a in world.attributes if len({world.entities[i].attributes[a] for i in indices}) == 1)
        rank[attribute] = rank.get(attribute, -1) + 1
        keyed.append((rank[attribute], position, indices))
    return [indices for _, _, indices in sorted(keyed)]


def split_common_sets(
    world: World, size: int, test: int, val: int, rng: np.random.Generator
) -> tuple[list[tuple[int, ...]], list[tuple[int, ...]], list[tuple[int, ...]]]:
    """Disjoint (test, val, corpus) pools of entity sets: a set asked about at test or validation time is
    never asked about in the corpus, so the answer cannot be memorised. Test and validation pools are
    balanced over the shared attribute."""
    sets = _interleave_by_attribute(world, usable_common_sets(world, size, rng))
    if len(sets) < test + val + 1:
        raise MMComposeError(
            f"the world has only {len(sets)} usable {size}-entity sets, {test + val + 1} needed; "
            "use more entities or fewer MCUB items"
        )
    return sets[:test], sets[test : test + val], sets[test + val :]


def common_items(world: World, sets: Sequence[tuple[int, ...]], rng: np.random.Generator) -> list[CommonItem]:
    """One question per set, entities in random input order, answer letters balanced."""
    items = []
    for indices, position in zip(sets, balanced_positions(len(sets), rng), strict=True):
        order = [int(i) for i in rng.permutation(indices)]
        item = common_item(world, order, position, rng)
        if item is None:
            raise MMComposeError(f"entity set {order} admits no common-attribute question")
        items.append(item)
    return items


def mcub_samples(
    items: Sequence[CommonItem], modalities: Sequence[str], renders: range, prefix: str, rng: np.random.Generator
) -> list[Sample]:
    """MCUB samples: input j of an item is modality `modalities[j]` rendering entity j, a random rendering
    from `renders`. Ids are `prefix-00000`... in item order."""
    samples = []
    for i, item in enumerate(items):
        inputs = {
            m: [media_path(m, name, int(rng.choice(renders)))]
            for m, name in zip(modalities, item.entities, strict=True)
        }
        human = item.human([tpl.PLACEHOLDERS[m] for m in modalities])
        samples.append(
            make_sample(f"{prefix}-{i:05d}", human, tpl.LETTERS[item.answer], inputs, item.meta("common_choice"))
        )
    return samples


def text_common_samples(items: Sequence[CommonItem], prefix: str) -> list[Sample]:
    """The text-only twins of MCUB samples: the same questions with entity names in place of media."""
    return [
        make_sample(
            f"{prefix}-{i:05d}", item.human(item.entities), tpl.LETTERS[item.answer], {}, item.meta("common_choice")
        )
        for i, item in enumerate(items)
    ]
