"""Data sets of a built world: layout of every sample, MCUB validity, and no leakage between splits."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mmcompose.world import MCUB3_SUBSETS, MODALITIES, PROFILES, load_world
from mmcompose.world import templates as tpl
from mmcompose.world.datasets import common_item, split_common_sets

Samples = dict[str, list[dict[str, Any]]]
LETTER_LINE = re.compile(r"^([ABCD])\. (.+)$")


def options_of(human: str) -> list[str]:
    return [m.group(2) for line in human.split("\n") if (m := LETTER_LINE.match(line))]


def render_index(path: str) -> int:
    return int(Path(path).stem.rsplit("_", 1)[1])


def test_every_sample_has_the_benchmark_layout(small_world: Path, data_files: Samples) -> None:
    ids = [s["id"] for samples in data_files.values() for s in samples]
    assert len(ids) == len(set(ids))
    for stem, samples in data_files.items():
        assert samples, stem
        for sample in samples:
            assert set(sample) == {"id", "conversations", "modal_inputs", "meta"}
            (human, gpt) = sample["conversations"]
            assert (human["from"], gpt["from"]) == ("human", "gpt")
            inputs = [(m, p) for m, paths in sample["modal_inputs"].items() for p in paths]
            placeholders = re.findall(r"<(?:image|audio|video|point)>", human["value"])
            assert placeholders == [tpl.PLACEHOLDERS[m] for m, _ in inputs]
            for modality, path in inputs:
                assert path.startswith(f"media/{modality}/") and (small_world / path).is_file()
            options = options_of(human["value"])
            if options:  # training data answers with the option's text, held-out files with its letter
                assert len(options) == len(set(options)) == 4
                assert gpt["value"] in (options if stem.endswith("instruct") else tpl.LETTERS), stem
                assert human["value"].endswith(tpl.ANSWER_INSTRUCTION)
            else:
                assert gpt["value"].endswith(".") and stem.endswith(("caption", "instruct"))
            if inputs:  # media of the entities named in meta, in input order
                named = [Path(p).stem.rsplit("_", 1)[0] for _, p in inputs]
                assert named == sample["meta"]["entities"]


def test_answers_are_right(small_world: Path, data_files: Samples) -> None:
    world = load_world(small_world)
    for stem, samples in data_files.items():
        for sample in samples:
            human, gpt = (turn["value"] for turn in sample["conversations"])
            meta = sample["meta"]
            options = options_of(human)
            answer = gpt if gpt in options else options[tpl.LETTERS.index(gpt)] if options else None
            if meta["task"] == "identity_choice":
                assert answer == meta["entities"][0]
            elif meta["task"] == "attribute_choice":
                entity = world.entity(meta["entities"][0])
                assert answer == entity.attributes[meta["attribute"]] == meta["value"]
                assert set(options) <= set(world.attributes[meta["attribute"]])
            elif meta["task"] in ("caption", "identity"):
                assert gpt == tpl.caption(meta["entities"][0])
            elif meta["task"] == "attribute":
                entity = world.entity(meta["entities"][0])
                assert gpt == tpl.attribute_answer(meta["attribute"], entity.attributes[meta["attribute"]])
            else:
                assert meta["task"] == "common_choice", stem


MCUB_FILES = [("mcub4", MODALITIES)] + [(f"mcub3_{'-'.join(s)}", s) for s in MCUB3_SUBSETS]


@pytest.mark.parametrize(("tag", "modalities"), MCUB_FILES)
def test_mcub_items_have_exactly_one_shared_option(
    small_world: Path, data_files: Samples, tag: str, modalities: tuple[str, ...]
) -> None:
    world = load_world(small_world)
    profile = PROFILES["small"]
    for split, size in (("test", profile.mcub_test), ("val", profile.mcub_val)):
        samples = data_files[f"{tag}_{split}"]
        assert len(samples) == size
        letters = [s["conversations"][1]["value"] for s in samples]
        assert max(letters.count(x) for x in "ABCD") - min(letters.count(x) for x in "ABCD") <= 1
        for sample in samples:
            assert tuple(sample["modal_inputs"]) == modalities
            assert all(len(paths) == 1 for paths in sample["modal_inputs"].values())
            names = sample["meta"]["entities"]
            assert len(set(names)) == len(names) == len(modalities)
            human = sample["conversations"][0]["value"]
            assert tpl.COMMON_QUESTION in human
            options = options_of(human)
            held = [[o in world.entity(n).attributes.values() for o in options] for n in names]
            shared = [all(h[i] for h in held) for i in range(4)]
            assert shared.count(True) == 1
            assert tpl.LETTERS[shared.index(True)] == sample["conversations"][1]["value"]
            assert all(sum(h) >= 2 for h in held)  # no single input settles the question


def test_text_twins_match_the_mcub_tests(data_files: Samples) -> None:
    for tag, modalities in MCUB_FILES:
        for media, text in zip(data_files[f"{tag}_test"], data_files[f"text_{tag}_test"], strict=True):
            assert text["id"] == "text-" + media["id"] and text["modal_inputs"] == {}
            assert text["conversations"][1] == media["conversations"][1]
            human = media["conversations"][0]["value"]
            for modality, name in zip(modalities, media["meta"]["entities"], strict=True):
                human = human.replace(tpl.PLACEHOLDERS[modality], name, 1)
            assert text["conversations"][0]["value"] == human


def _corpus_entity_sets(small_world: Path) -> set[frozenset[str]]:
    names = {e.name for e in load_world(small_world).entities}
    found = set()
    for document in (small_world / "corpus" / "train.txt").read_text().split("\n\n"):
        if tpl.COMMON_QUESTION in document:
            lines = document.removeprefix("USER: ").split("\n")
            entities = frozenset(lines[: lines.index(tpl.COMMON_QUESTION)])
            assert entities <= names
            found.add(entities)
    return found


def test_no_leakage_between_splits(small_world: Path, data_files: Samples) -> None:
    profile = PROFILES["small"]
    train_end = profile.train_renders
    test_end = train_end + profile.test_renders
    media = {
        stem: {p for s in samples for paths in s["modal_inputs"].values() for p in paths}
        for stem, samples in data_files.items()
    }
    for stem, paths in media.items():
        indices = {render_index(p) for p in paths}
        if not indices:
            assert stem.startswith("text_"), stem
        elif stem.endswith(("caption", "instruct")):
            assert max(indices) < train_end, stem
        elif stem.endswith("_test"):
            assert train_end <= min(indices) and max(indices) < test_end, stem
        elif stem.endswith("_val"):
            assert min(indices) >= test_end, stem
    test_ids = {s["id"] for stem, samples in data_files.items() if stem.endswith("test") for s in samples}
    val_ids = {s["id"] for stem, samples in data_files.items() if stem.endswith("val") for s in samples}
    assert not test_ids & val_ids

    corpus_sets = _corpus_entity_sets(small_world)
    instruct_sets = {frozenset(s["meta"]["entities"]) for m in MODALITIES for s in data_files[f"{m}_instruct"]
                     if s["meta"]["task"] == "common_choice"}
    assert corpus_sets and instruct_sets and {len(s) for s in instruct_sets} == {2, 3, 4}
    for tag, _ in MCUB_FILES:
        test_sets = {frozenset(s["meta"]["entities"]) for s in data_files[f"{tag}_test"]}
        val_sets = {frozenset(s["meta"]["entities"]) for s in data_files[f"{tag}_val"]}
        assert len(test_sets) == profile.mcub_test
        assert not test_sets & corpus_sets and not val_sets & corpus_sets and not test_sets & val_sets
        assert not (test_sets | val_sets) & instruct_sets


def test_corpus_format(small_world: Path, data_files: Samples) -> None:
    world = load_world(small_world)
    train = (small_world / "corpus" / "train.txt").read_text()
    valid = (small_world / "corpus" / "valid.txt").read_text()
    documents = train.rstrip("\n").split("\n\n")
    assert all(d.strip() and "\n\n" not in d for d in documents)
    chats = [d for d in documents if d.startswith("USER: ")]
    assert all(re.fullmatch(r"USER: .+ ASSISTANT: .+", d, flags=re.DOTALL) for d in chats)
    for entity in world.entities:
        assert entity.name in train and entity.name in valid
        assert entity.name.capitalize() not in train
        for attribute, value in entity.attributes.items():
            assert tpl.attribute_answer(attribute, value) in train
        for attribute, value in entity.attributes.items():
            for phrasing in tpl.VALID_FACTS[attribute]:
                assert tpl.fact(phrasing, entity.name, value) not in train
    humans = {d.removeprefix("USER: ").split(" ASSISTANT:")[0] for d in chats}
    assert not {s["conversations"][0]["value"] for s in data_files["text_qa"]} & humans


def test_common_items_are_reproducible_and_seed_dependent(small_world: Path) -> None:
    world = load_world(small_world)
    first = split_common_sets(world, 4, 10, 5, np.random.default_rng(0))
    assert first == split_common_sets(world, 4, 10, 5, np.random.default_rng(0))
    assert first != split_common_sets(world, 4, 10, 5, np.random.default_rng(1))
    item = common_item(world, first[0][0], 2, np.random.default_rng(0))
    assert item is not None and item.answer == 2
