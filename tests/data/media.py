"""Small real media files (Pillow PNG, libsndfile WAV) and data files of each layout, for the data tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import soundfile
from PIL import Image


def write_png(path: Path, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (20, 24, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def write_wav(path: Path, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(path, np.random.default_rng(seed).uniform(-0.5, 0.5, 1600).astype(np.float32), 16000)
    return path


def write_json(path: Path, data: Any) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def turns(*values: str) -> list[dict[str, str]]:
    """Alternating human/gpt turns."""
    return [{"from": ("human", "gpt")[i % 2], "value": value} for i, value in enumerate(values)]
