"""Session fixtures: one small valid file per format, written with the real encoders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from tests.io.media import encode_video, sine


@pytest.fixture(scope="session")
def seeds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One small valid file per format, used as mutation seeds by the fuzz tests."""
    import trimesh

    root = tmp_path_factory.mktemp("seeds")
    files: dict[str, Path] = {}
    rng = np.random.default_rng(0)
    picture = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8))
    for fmt, ext in [("PNG", "png"), ("JPEG", "jpg"), ("GIF", "gif"), ("BMP", "bmp"), ("WEBP", "webp")]:
        files[ext] = root / f"seed.{ext}"
        picture.save(files[ext], format=fmt)
    stereo = np.stack([sine(440, 8000, 0.25), sine(660, 8000, 0.25)], axis=1)
    for fmt, ext in [("WAV", "wav"), ("FLAC", "flac"), ("OGG", "ogg")]:
        files[ext] = root / f"seed.{ext}"
        sf.write(files[ext], stereo, 8000, format=fmt)
    files["mp4"] = encode_video(root / "seed.mp4", "libx264", 4)
    files["webm"] = encode_video(root / "seed.webm", "libvpx-vp9", 4)
    files["avi"] = encode_video(root / "seed.avi", "mpeg4", 4)
    box = trimesh.creation.box()
    for ext in ("ply", "obj", "off"):
        files[ext] = root / f"seed.{ext}"
        box.export(files[ext])
    files["npy"] = root / "seed.npy"
    np.save(files["npy"], rng.standard_normal((40, 6)))
    return files
