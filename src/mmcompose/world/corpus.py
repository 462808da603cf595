"""The text corpus the base LLM is pretrained on: all of its world knowledge, and the question skills.

Documents are separated by one blank line and never contain one. Three kinds are mixed (shuffled):
facts in varied phrasings; single-entity chat turns (caption, identity and attribute questions, open and
multiple choice); and common-attribute multiple-choice questions over 2-4 entities. Multiple choice is
answered with the option's text (see `datasets.Choice`). Chat turns use the exact
layout of the multimodal data with entity names in place of the media placeholders, so a model that later
sees media where the names were meets a familiar template. The validation corpus states the same facts in
phrasings the training corpus never uses, so its perplexity measures knowledge rather than memorised strings.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mmcompose.world import templates as tpl
from mmcompose.world.datasets import attribute_choice, balanced_positions, common_item, identity_choice
from mmcompose.world.entities import World


def fact_documents(
    world: World, phrasings: dict[str, tuple[str, ...]], per_entity: int, rng: np.random.Generator
) -> list[str]:
    """`per_entity` short paragraphs per entity, each stating 1 to all of its facts in random phrasings."""
    attributes = list(world.attributes)
    documents = []
    for e in world.entities:
        for _ in range(per_entity):
            count = int(rng.integers(1, len(attributes) + 1))
            chosen = [attributes[i] for i in rng.permutation(len(attributes))[:count]]
            documents.append(" ".join(tpl.fact(str(rng.choice(phrasings[a])), e.name, e.attributes[a]) for a in chosen))
    return documents


def chat_documents(world: World, repeats: int, rng: np.random.Generator) -> list[str]:
    """Single-entity chat turns with the name in place of the medium: the caption turn, the identity
    question (open, and `repeats` multiple choices), and per attribute the open question and `repeats`
    multiple choices (fresh options and order each time)."""
    per_entity = repeats * (1 + len(world.attributes))
    positions = iter(balanced_positions(per_entity * len(world.entities), rng))
    documents = []
    for e in world.entities:
        name = [e.name]
        documents.append(tpl.chat_document(tpl.human_turn(name), tpl.caption(e.name)))
        documents.append(tpl.chat_document(tpl.human_turn(name, tpl.IDENTITY_QUESTION), tpl.caption(e.name)))
        for _ in range(repeats):
            choice = identity_choice(world, e.name, next(positions), rng)
            documents.append(tpl.chat_document(tpl.human_turn(name, choice.question), choice.text))
        for attribute, value in e.attributes.items():
            documents.append(
                tpl.chat_document(
                    tpl.human_turn(name, tpl.ATTRIBUTE_QUESTIONS[attribute]), tpl.attribute_answer(attribute, value)
                )
            )
            for _ in range(repeats):
                choice = attribute_choice(world, e.name, attribute, next(positions), rng)
                documents.append(tpl.chat_document(tpl.human_turn(name, choice.question), choice.text))
    return documents


def common_documents(world: World, sets: Sequence[tuple[int, ...]], count: int, rng: np.random.Generator) -> list[str]:
    """`count` common-attribute questions with names in place of media, over entity sets drawn from `sets`
    (with repetition, each time with fresh input order and distractors), answer letters balanced."""
    documents = []
    for position in balanced_positions(count, rng):
        indices = sets[int(rng.integers(len(sets)))]
        item = common_item(world, [int(i) for i in rng.permutation(indices)], position, rng)
        if item is not None:
            documents.append(tpl.chat_document(item.human(item.entities), item.options[item.answer]))
    return documents


def join_documents(documents: Sequence[str], rng: np.random.Generator) -> str:
    """The documents in random order, separated by blank lines, ending with a newline."""
    return "\n\n".join(documents[i] for i in rng.permutation(len(documents))) + "\n"


def chat_human(document: str) -> str:
    """The human turn of a chat document (the inverse of `templates.chat_document` for the human side)."""
    return document.removeprefix("USER: ").split(" ASSISTANT:", 1)[0]
