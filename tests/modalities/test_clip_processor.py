"""The `clip-image` processor: decode with mmcompose.io, then CLIP's resize / crop / normalise."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from mmcompose.errors import InputError
from mmcompose.modalities import build_processor


def _image(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _reference(image: np.ndarray, size: int, crop: int) -> torch.Tensor:
    """Shortest edge to `size` (bicubic), centre crop, /255, OpenAI CLIP mean and std -- with PIL and numpy."""
    height, width = image.shape[:2]
    scale = size / min(height, width)
    resized = Image.fromarray(image).resize((round(width * scale), round(height * scale)), Image.BICUBIC)
    left, top = (resized.width - crop) // 2, (resized.height - crop) // 2
    pixels = np.asarray(resized.crop((left, top, left + crop, top + crop)), dtype=np.float32) / 255
    pixels = (pixels - np.array(OPENAI_CLIP_MEAN, dtype=np.float32)) / np.array(OPENAI_CLIP_STD, dtype=np.float32)
    return torch.from_numpy(pixels).permute(2, 0, 1)


def test_clip_pixels_from_a_file_and_an_array(tmp_path: Path) -> None:
    image = _image(30, 40)
    Image.fromarray(image).save(tmp_path / "picture.png")
    processor = build_processor("clip-image", {"size": 24, "crop_size": 20})
    from_file, from_array = processor(tmp_path / "picture.png"), processor(image)
    assert from_file.shape == (3, 20, 20) and from_file.dtype == torch.float32
    torch.testing.assert_close(from_file, from_array)
    torch.testing.assert_close(from_array, _reference(image, 24, 20), atol=2e-2, rtol=0)


def test_pad_to_square_keeps_the_whole_image() -> None:
    wide = _image(10, 30)
    padded = build_processor("clip-image", {"size": 30, "pad_to_square": True})(wide)
    assert padded.shape == (3, 30, 30)  # padded to 30 x 30 first: no resize, nothing cropped away
    mean, std = torch.tensor(OPENAI_CLIP_MEAN).view(3, 1, 1), torch.tensor(OPENAI_CLIP_STD).view(3, 1, 1)
    background = (torch.tensor([round(255 * m) for m in OPENAI_CLIP_MEAN]).view(3, 1, 1) / 255 - mean) / std
    torch.testing.assert_close(padded[:, :10], background.expand(3, 10, 30), atol=1e-5, rtol=0)
    torch.testing.assert_close(padded[:, 20:], background.expand(3, 10, 30), atol=1e-5, rtol=0)
    original = (torch.from_numpy(wide).permute(2, 0, 1) / 255 - mean) / std
    torch.testing.assert_close(padded[:, 10:20], original, atol=1e-5, rtol=0)
    assert build_processor("clip-image", {"size": 30})(wide).shape == (3, 30, 30)  # without: a centre crop


def test_bad_input_is_an_input_error(tmp_path: Path) -> None:
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    with pytest.raises(InputError):
        build_processor("clip-image", {})(tmp_path / "broken.png")
