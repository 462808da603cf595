"""Building a world directory: layout, determinism, real media formats, atomicity."""

from __future__ import annotations

import json
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile
from PIL import Image

from mmcompose.errors import MMComposeError
from mmcompose.world import MCUB3_SUBSETS, MODALITIES, PROFILES, Profile, build_world, load_world, make_world
from mmcompose.world import build as build_module
from mmcompose.world.entities import stream
from mmcompose.world.render import RENDERERS

SMALL_SEED = 7  # the seed of the `small_world` fixture


def test_layout(small_world: Path) -> None:
    subsets = ["-".join(s) for s in MCUB3_SUBSETS]
    expected = {"text_qa", "mcub4_test", "mcub4_val", "text_mcub4_test"}
    expected |= {f"{m}_{kind}" for m in MODALITIES for kind in ("caption", "instruct", "test")}
    expected |= {f"mcub3_{s}_{split}" for s in subsets for split in ("test", "val")}
    expected |= {f"text_mcub3_{s}_test" for s in subsets}
    assert {p.stem for p in (small_world / "data").iterdir()} == expected
    assert {p.name for p in (small_world / "corpus").iterdir()} == {"train.txt", "valid.txt"}
    description = json.loads((small_world / "world.json").read_text())
    assert description["seed"] == SMALL_SEED and description["profile"] == "small"
    assert len(description["content_sha256"]) == 64
    profile = PROFILES["small"]
    renders = profile.train_renders + profile.test_renders + profile.val_renders
    for modality in MODALITIES:
        assert len(list((small_world / "media" / modality).iterdir())) == profile.num_entities * renders
    assert load_world(small_world) == make_world(SMALL_SEED, profile.num_entities)
    assert not [p for p in small_world.parent.iterdir() if p != small_world]


TINY = Profile(
    num_entities=16,
    train_renders=1,
    test_renders=1,
    val_renders=1,
    mcub_test=8,
    mcub_val=4,
    fact_docs=2,
    valid_fact_docs=1,
    qa_repeats=1,
    common_docs=(10, 10, 10),
    instruct_common=4,
)


def _all_files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(PROFILES, "tiny", TINY)
    first = _all_files(build_world(3, tmp_path / "first", profile="tiny"))
    assert first == _all_files(build_world(3, tmp_path / "again", profile="tiny"))
    other = _all_files(build_world(4, tmp_path / "other", profile="tiny"))
    assert other["world.json"] != first["world.json"]
    assert other["corpus/train.txt"] != first["corpus/train.txt"]
    assert other["data/mcub4_test.json"] != first["data/mcub4_test.json"]


def _decode(path: Path) -> np.ndarray:
    if path.suffix == ".png":
        with Image.open(path) as image:
            assert image.mode == "RGB"
            return np.asarray(image)
    if path.suffix == ".wav":
        info = soundfile.info(path)
        assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
        return soundfile.read(path, dtype="float32")[0]
    if path.suffix == ".mp4":
        with av.open(str(path)) as container:
            return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    return np.load(path, allow_pickle=False)


SHAPES = {
    "image": ((32, 32, 3), np.uint8),
    "audio": ((16000,), np.float32),
    "video": ((8, 32, 32, 3), np.uint8),
    "point": ((512, 3), np.float32),
}


@pytest.mark.parametrize("modality", MODALITIES)
def test_every_media_file_decodes(small_world: Path, modality: str) -> None:
    shape, dtype = SHAPES[modality]
    for path in (small_world / "media" / modality).iterdir():
        array = _decode(path)
        assert array.shape == shape and array.dtype == dtype, path.name


@pytest.mark.parametrize("modality", MODALITIES)
def test_files_hold_the_rendering(small_world: Path, modality: str) -> None:
    """A file decodes to its renderer's output (exactly, or within the format's quantisation)."""
    world = load_world(small_world)
    index, k = 5, 3
    entity = world.entities[index]
    expected = RENDERERS[modality](entity, stream(SMALL_SEED, "render", MODALITIES.index(modality), index, k))
    ext = {"image": "png", "audio": "wav", "video": "mp4", "point": "npy"}[modality]
    decoded = _decode(small_world / "media" / modality / f"{entity.name}_{k}.{ext}")
    error = np.abs(decoded.astype(np.float64) - expected.astype(np.float64))
    tolerance = {"image": 0.0, "audio": 1.0 / 32768, "video": 8.0, "point": 0.0}[modality]
    assert error.mean() <= tolerance


def test_failed_build_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail_midway(_world: object, root: Path, _renders: int) -> None:
        (root / "media").mkdir()
        (root / "media" / "partial.png").write_bytes(b"half")
        raise RuntimeError("disk full")

    monkeypatch.setattr(build_module, "_write_media", fail_midway)
    with pytest.raises(RuntimeError, match="disk full"):
        build_world(1, tmp_path / "world", profile="small")
    assert list(tmp_path.iterdir()) == []

    existing = tmp_path / "kept"
    existing.mkdir()
    (existing / "old.txt").write_text("old")
    with pytest.raises(RuntimeError, match="disk full"):
        build_world(1, existing, profile="small", overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["kept"]
    assert (existing / "old.txt").read_text() == "old"


def test_overwrite_replaces_only_when_complete(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(build_module, "_write_media", lambda *_: None)
    monkeypatch.setattr(build_module, "_write_data", lambda _w, _p, root: (root / "new.txt").write_text("new"))
    target = tmp_path / "world"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(MMComposeError, match="already exists"):
        build_world(1, target, profile="small")
    build_world(1, target, profile="small", overwrite=True)
    assert sorted(p.name for p in target.iterdir()) == ["new.txt", "world.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["world"]


def test_unknown_profile(tmp_path: Path) -> None:
    with pytest.raises(MMComposeError, match="unknown world profile"):
        build_world(1, tmp_path / "w", profile="huge")
    assert list(tmp_path.iterdir()) == []
