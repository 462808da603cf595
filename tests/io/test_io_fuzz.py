"""Fuzzing: random bytes and mutated real files may be refused, but only ever with InputError.

A successful decode must still honour the loader's output contract (dtype, layout, finite values).
Inputs that once broke a loader live in tests/io/crashers/ and are replayed by `test_crashers`.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mmcompose.errors import InputError
from mmcompose.io import load_audio, load_image, load_points, load_video

CRASHERS = Path(__file__).parent / "crashers"
FUZZ = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _image(path: Path) -> None:
    out = load_image(path)
    assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3


def _audio(path: Path) -> None:
    out = load_audio(path)
    assert out.dtype == np.float32 and out.ndim == 1 and out.size > 0 and np.isfinite(out).all()


def _video(path: Path) -> None:
    out = load_video(path, num_frames=3)
    assert out.dtype == np.uint8 and out.ndim == 4 and out.shape[0] == 3 and out.shape[3] == 3


def _points(path: Path) -> None:
    out = load_points(path, num_points=16, with_color=path.suffix == ".npy")
    assert out.dtype == np.float32 and out.shape[0] == 16 and np.isfinite(out).all()


CHECKS: dict[str, Callable[[Path], None]] = {
    **dict.fromkeys(["png", "jpg", "gif", "bmp", "webp"], _image),
    **dict.fromkeys(["wav", "flac", "ogg"], _audio),
    **dict.fromkeys(["mp4", "webm", "avi"], _video),
    **dict.fromkeys(["ply", "obj", "off", "npy"], _points),
}


def check(path: Path) -> None:
    """Run the loader for `path`'s suffix; InputError is an acceptable outcome, nothing else is."""
    try:
        CHECKS[path.suffix[1:]](path)
    except InputError as exc:
        assert "\n" not in str(exc) and str(exc).startswith(f"{path}: ")


def fix_png_crcs(data: bytearray) -> bytearray:
    """Recompute chunk CRCs so mutations reach the decoder instead of stopping at the checksum test."""
    pos = 8
    while pos + 12 <= len(data):
        size = struct.unpack(">I", data[pos : pos + 4])[0]
        if pos + 12 + size > len(data):
            break
        data[pos + 8 + size : pos + 12 + size] = struct.pack(">I", zlib.crc32(bytes(data[pos + 4 : pos + 8 + size])))
        pos += 12 + size
    return data


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@pytest.mark.parametrize("ext", sorted(CHECKS))
@FUZZ
@given(data=st.binary(max_size=2048))
def test_random_bytes(fuzz_dir: Path, ext: str, data: bytes) -> None:
    path = fuzz_dir / f"random.{ext}"
    path.write_bytes(data)
    check(path)


mutations = st.lists(st.tuples(st.integers(0, 2**31), st.integers(0, 255)), min_size=1, max_size=12)


@pytest.mark.parametrize("ext", sorted(CHECKS))
@FUZZ
@given(flips=mutations, keep=st.one_of(st.none(), st.floats(0.0, 1.0)))
def test_mutated_files(seeds: dict[str, Path], fuzz_dir: Path, ext: str, flips: list, keep: float | None) -> None:
    data = bytearray(seeds[ext].read_bytes())
    for position, value in flips:
        data[position % len(data)] = value
    if keep is not None:
        data = data[: int(len(data) * keep)]
    if ext == "png":
        data = fix_png_crcs(data)
    path = fuzz_dir / f"mutated.{ext}"
    path.write_bytes(bytes(data))
    check(path)


# Inputs that once escaped as a non-InputError or were silently accepted, with the refusal now expected.
CRASHER_MESSAGES = {
    "points-truncated-ascii.ply": "truncated PLY (header declares 5 vertex elements, file holds 3)",
    "points-non-utf8.obj": "file contains no vertices",  # was ModuleNotFoundError: charset_normalizer
}


def test_every_crasher_is_registered() -> None:
    assert sorted(path.name for path in CRASHERS.iterdir()) == sorted(CRASHER_MESSAGES)


@pytest.mark.parametrize(("name", "message"), sorted(CRASHER_MESSAGES.items()))
def test_crashers(name: str, message: str) -> None:
    path = CRASHERS / name
    with pytest.raises(InputError) as info:
        CHECKS[path.suffix[1:]](path)
    assert str(info.value) == f"{path}: {message}"
