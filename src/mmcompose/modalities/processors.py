"""Processors: decode one input (path or array) and normalise it into the tensor its encoder expects.

Decoding lives in `mmcompose.io` (one loader per format family, each hardened against bad files); the
processors here only resize, fit lengths and normalise, and document their output shape and dtype.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from mmcompose.io import fit_length, load_audio, load_image, load_points, load_video

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _normalise_frames(frames: np.ndarray, size: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 `(..., H, W, 3)` -> float32 `(..., 3, size, size)`, bicubic resize, per-channel normalised."""
    flat = frames.reshape(-1, *frames.shape[-3:])
    if flat.shape[1:3] != (size, size):
        # reducing_gap: a box pre-reduction before bicubic, 2x faster on large inputs, within 1/255 per pixel
        flat = np.stack([np.asarray(Image.fromarray(f).resize((size, size), Image.BICUBIC, reducing_gap=3.0))
                         for f in flat])
    tensor = torch.from_numpy(flat.astype(np.float32) / 255.0).permute(0, 3, 1, 2)
    tensor = (tensor - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    return tensor.reshape(*frames.shape[:-3], 3, size, size)


def pad_to_square(image: np.ndarray, mean: Sequence[float]) -> np.ndarray:
    """uint8 `(H, W, 3)` centred on a square canvas of the mean colour (`mean` in 0..1), as LLaVA-1.5's
    `image_aspect_ratio: pad` does before resizing, so a resize keeps the aspect ratio and the whole image."""
    height, width = image.shape[:2]
    if height == width:
        return image
    side = max(height, width)
    canvas = Image.new("RGB", (side, side), tuple(round(255 * m) for m in mean))
    canvas.paste(Image.fromarray(image), ((side - width) // 2, (side - height) // 2))
    return np.asarray(canvas)


class ImageProcessor:
    """Any image input -> float32 `(3, size, size)`, RGB, normalised with `mean`/`std`. `pad_to_square` first
    pads the image to a square of the mean colour (`image_aspect_ratio: pad`), instead of stretching it."""

    def __init__(self, size: int = 32, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD, pad_to_square: bool = False) -> None:
        self.size, self.mean, self.std, self.pad_to_square = size, tuple(mean), tuple(std), pad_to_square

    def __call__(self, source: Any) -> torch.Tensor:
        image = load_image(source)
        if self.pad_to_square:
            image = pad_to_square(image, self.mean)
        return _normalise_frames(image, self.size, self.mean, self.std)


class VideoProcessor:
    """Any video input -> float32 `(num_frames, 3, size, size)`, frames sampled uniformly over time."""

    def __init__(self, num_frames: int = 8, size: int = 32, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD) -> None:
        self.num_frames, self.size, self.mean, self.std = num_frames, size, tuple(mean), tuple(std)

    def __call__(self, source: Any) -> torch.Tensor:
        return _normalise_frames(load_video(source, num_frames=self.num_frames), self.size, self.mean, self.std)


class AudioProcessor:
    """Any audio input -> float32 `(num_samples,)` mono at `sample_rate`, padded or trimmed explicitly."""

    def __init__(self, sample_rate: int = 16000, num_samples: int = 16000,
                 length_policy: Literal["pad", "trim", "pad_or_trim"] = "pad_or_trim") -> None:
        self.sample_rate, self.num_samples, self.length_policy = sample_rate, num_samples, length_policy

    def __call__(self, source: Any) -> torch.Tensor:
        wave = load_audio(source, sample_rate=self.sample_rate)
        return torch.from_numpy(fit_length(wave, self.num_samples, self.length_policy))


class PointProcessor:
    """Any point-cloud input -> float32 `(num_points, 3)` (or 6 with colour), centred, in the unit sphere."""

    def __init__(self, num_points: int = 512, with_color: bool = False) -> None:
        self.num_points, self.with_color = num_points, with_color

    def __call__(self, source: Any) -> torch.Tensor:
        return torch.from_numpy(load_points(source, num_points=self.num_points, with_color=self.with_color))
