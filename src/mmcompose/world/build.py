"""Build a world directory (media, corpus, data sets, world.json) atomically from a seed and a profile.

Layout (paths relative to the world directory; the data file names come from `mmcompose.data.names`):

    world.json                                   seed, profile, attributes, entities, content hash
    corpus/train.txt, corpus/valid.txt           documents separated by blank lines
    media/<modality>/<entity>_<k>.<png|wav|mp4|npy>
    data/text_qa.json                            text-only attribute multiple choice (base LLM eval)
    data/text_mcub4_test.json, data/text_mcub3_<subset>_test.json   MCUB test items with names for media
    data/<modality>_caption.json, data/<modality>_instruct.json, data/<modality>_test.json
    data/mcub4_test.json, data/mcub4_val.json, data/mcub3_<subset>_test.json, data/mcub3_<subset>_val.json

Rendering indices k are split per entity and modality: [0, train) for caption/instruction data,
[train, train+test) for the single-modality and MCUB tests, the rest for MCUB validation; each rendering has
its own noise stream, so no test input is ever a training input.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mmcompose.data import names
from mmcompose.errors import MMComposeError
from mmcompose.files import atomic_directory
from mmcompose.world import corpus
from mmcompose.world import datasets as ds
from mmcompose.world import templates as tpl
from mmcompose.world.entities import MODALITIES, World, make_world, stream
from mmcompose.world.render import RENDERERS, WRITERS

FORMAT_VERSION = 1

@dataclass(frozen=True)
class Profile:
    """Sizes of a build. Counts of renderings are per entity and modality; fact documents per entity;
    `qa_repeats` multiple-choice chat turns per entity and question; `common_docs[k]` corpus questions over
    k+2 entities (k = 0, 1, 2); `instruct_common` multi-input questions per modality's instruction set."""

    num_entities: int
    train_renders: int
    test_renders: int
    val_renders: int
    mcub_test: int
    mcub_val: int
    fact_docs: int
    valid_fact_docs: int
    qa_repeats: int
    common_docs: tuple[int, int, int]
    instruct_common: int


PROFILES: dict[str, Profile] = {
    "large": Profile(
        num_entities=48,
        train_renders=12,
        test_renders=4,
        val_renders=2,
        mcub_test=200,
        mcub_val=50,
        fact_docs=24,
        valid_fact_docs=4,
        qa_repeats=3,
        common_docs=(1500, 3000, 3000),
        instruct_common=768,
    ),
    "small": Profile(
        num_entities=24,
        train_renders=4,
        test_renders=2,
        val_renders=1,
        mcub_test=60,
        mcub_val=20,
        fact_docs=12,
        valid_fact_docs=2,
        qa_repeats=2,
        common_docs=(300, 600, 600),
        instruct_common=128,
    ),
}


def _write_json(path: Path, data: Any) -> None:
    """JSON, a list with one element per line (readable, and fast to write with the C encoder)."""
    if isinstance(data, list):
        text = "[\n" + ",\n".join(json.dumps(x, ensure_ascii=False) for x in data) + "\n]\n"
    else:
        text = json.dumps(data, indent=1, ensure_ascii=False) + "\n"
    path.write_text(text, encoding="utf-8")


def _content_hash(root: Path) -> str:
    """SHA-256 over every file's relative path and bytes (sorted), world.json excluded."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.name != "world.json"):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def _write_media(world: World, root: Path, renders: int) -> None:
    """Render and save renderings 0..renders-1 of every entity in every modality (one noise stream each)."""
    for m_index, modality in enumerate(MODALITIES):
        folder = root / "media" / modality
        folder.mkdir(parents=True)
        for e_index, entity in enumerate(world.entities):
            for k in range(renders):
                array = RENDERERS[modality](entity, stream(world.seed, "render", m_index, e_index, k))
                WRITERS[modality](root / ds.media_path(modality, entity.name, k), array)


def _write_data(world: World, profile: Profile, root: Path) -> None:
    """Write data/ and corpus/; each file draws from its own random stream, so files are independent."""
    seed = world.seed
    train = range(profile.train_renders)
    test = range(profile.train_renders, profile.train_renders + profile.test_renders)
    val = range(test.stop, test.stop + profile.val_renders)
    data = root / "data"
    data.mkdir()

    pools = {
        size: ds.split_common_sets(world, size, profile.mcub_test, profile.mcub_val, stream(seed, "sets", size))
        for size in (3, 4)
    }
    pairs = ds.usable_common_sets(world, 2, stream(seed, "sets", 2))
    corpus_sets = (pairs, pools[3][2], pools[4][2])  # never asked about at test or validation time
    for modality in MODALITIES:
        _write_json(
            data / names.caption_file(modality),
            ds.caption_samples(world, modality, train, stream(seed, "caption", modality)),
        )
        _write_json(
            data / names.instruct_file(modality),
            ds.instruct_samples(world, modality, train, stream(seed, "instruct", modality))
            + ds.instruct_common_samples(world, modality, corpus_sets, profile.instruct_common, train,
                                         stream(seed, "instruct-common", modality)),
        )
        _write_json(
            data / names.single_test_file(modality),
            ds.single_test_samples(world, modality, test, stream(seed, "test", modality)),
        )

    for subset in names.mcub_subsets():
        test_sets, val_sets, _ = pools[len(subset)]
        for split, sets, renders in (("test", test_sets, test), ("val", val_sets, val)):
            rng = stream(seed, "mcub", names.world_mcub_tag(subset), split)
            items = ds.common_items(world, [sets[i] for i in rng.permutation(len(sets))], rng)
            prefix = names.world_mcub_id_prefix(subset, split)
            _write_json(data / names.world_mcub_file(subset, split), ds.mcub_samples(items, subset, renders, prefix,
                                                                                     rng))
            if split == "test":
                _write_json(data / names.world_text_mcub_file(subset), ds.text_common_samples(items, f"text-{prefix}"))

    train_docs = corpus.fact_documents(world, tpl.TRAIN_FACTS, profile.fact_docs, stream(seed, "corpus", "facts"))
    chat_docs = corpus.chat_documents(world, profile.qa_repeats, stream(seed, "corpus", "chat"))
    train_docs += chat_docs
    for size, (sets, count) in enumerate(zip(corpus_sets, profile.common_docs, strict=True), start=2):
        train_docs += corpus.common_documents(world, sets, count, stream(seed, "corpus", "common", size))
    valid_docs = corpus.fact_documents(world, tpl.VALID_FACTS, profile.valid_fact_docs, stream(seed, "corpus", "valid"))
    (root / "corpus").mkdir()
    (root / "corpus" / "train.txt").write_text(
        corpus.join_documents(train_docs, stream(seed, "corpus", "order")), encoding="utf-8"
    )
    (root / "corpus" / "valid.txt").write_text(
        corpus.join_documents(valid_docs, stream(seed, "corpus", "vorder")), encoding="utf-8"
    )
    seen = {corpus.chat_human(doc) for doc in chat_docs}
    _write_json(data / names.TEXT_QA_FILE, ds.text_qa_samples(world, seen, stream(seed, "text_qa")))


def resolve_profile(profile: str) -> Profile:
    """The named profile, or a one-line error listing the known ones."""
    if profile not in PROFILES:
        raise MMComposeError(f"unknown world profile {profile!r}; choose one of {', '.join(sorted(PROFILES))}")
    return PROFILES[profile]


def build_world(seed: int, out_dir: Path, profile: str = "small", *, overwrite: bool = False) -> Path:
    """Generate the world of `seed` with `profile` into `out_dir` and return `out_dir`.

    Everything is written into a sibling temporary directory that is renamed into place at the end, so
    `out_dir` either appears complete or not at all (with `overwrite`, an existing `out_dir` is replaced
    only once the new build is complete). The same seed and profile always give byte-identical files.
    """
    settings = resolve_profile(profile)
    out_dir = Path(out_dir)
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        world = make_world(seed, settings.num_entities)
        _write_media(world, tmp, settings.train_renders + settings.test_renders + settings.val_renders)
        _write_data(world, settings, tmp)
        description = {
            "format": FORMAT_VERSION,
            "profile": profile,
            "settings": asdict(settings),
            "modalities": list(MODALITIES),
            **world.to_dict(),
            "content_sha256": _content_hash(tmp),
        }
        _write_json(tmp / "world.json", description)
    return out_dir


def load_world(world_dir: Path) -> World:
    """The `World` described by a built directory's world.json."""
    path = Path(world_dir) / "world.json"
    try:
        description = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise MMComposeError(f"cannot read {path}: {exc}") from exc
    if not isinstance(description, dict) or description.get("format") != FORMAT_VERSION:
        raise MMComposeError(f"{path} is not a world description of format {FORMAT_VERSION}")
    return World.from_dict(description)
