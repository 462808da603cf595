"""The built-in processors on real files: documented shapes, dtypes and values."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from PIL import Image

from mmcompose.errors import InputError
from mmcompose.modalities.processors import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    AudioProcessor,
    ImageProcessor,
    PointProcessor,
    VideoProcessor,
)
from mmcompose.world import write_video


def test_image_processor_resizes_and_normalises(tmp_path: Path) -> None:
    Image.new("RGB", (64, 48), (255, 0, 0)).save(tmp_path / "red.png")
    pixels = ImageProcessor(size=32)(tmp_path / "red.png")
    assert pixels.shape == (3, 32, 32) and pixels.dtype == torch.float32
    expected = [(1 - IMAGENET_MEAN[0]) / IMAGENET_STD[0], -IMAGENET_MEAN[1] / IMAGENET_STD[1],
                -IMAGENET_MEAN[2] / IMAGENET_STD[2]]
    torch.testing.assert_close(pixels.mean((1, 2)), torch.tensor(expected), atol=1e-4, rtol=0)


def test_audio_processor_resamples_and_pads(tmp_path: Path) -> None:
    seconds = np.arange(4000) / 8000
    soundfile.write(tmp_path / "tone.wav", 0.5 * np.sin(2 * np.pi * 440 * seconds), 8000)
    wave = AudioProcessor(sample_rate=16000, num_samples=16000)(tmp_path / "tone.wav")
    assert wave.shape == (16000,) and wave.dtype == torch.float32
    assert wave[:8000].abs().max() > 0.4 and wave[8100:].abs().max() == 0  # 0.5 s of tone, then padding
    with pytest.raises(InputError):
        AudioProcessor(num_samples=4000, length_policy="pad")(tmp_path / "tone.wav")


def test_video_processor_samples_frames(tmp_path: Path) -> None:
    frames = np.zeros((16, 32, 32, 3), dtype=np.uint8)
    frames[:, :, :, 1] = np.linspace(0, 240, 16, dtype=np.uint8)[:, None, None]
    write_video(tmp_path / "ramp.mp4", frames)
    video = VideoProcessor(num_frames=4, size=16)(tmp_path / "ramp.mp4")
    assert video.shape == (4, 3, 16, 16) and video.dtype == torch.float32
    green = video[:, 1].mean((1, 2))
    assert bool((green[1:] > green[:-1]).all())  # uniformly sampled over time, in order


def test_point_processor_samples_centres_and_scales(tmp_path: Path) -> None:
    points = np.random.default_rng(0).normal(5.0, 3.0, size=(2000, 3)).astype(np.float32)
    np.save(tmp_path / "cloud.npy", points)
    cloud = PointProcessor(num_points=512)(tmp_path / "cloud.npy")
    assert cloud.shape == (512, 3) and cloud.dtype == torch.float32
    assert cloud.mean(0).abs().max() < 1e-4 and abs(cloud.norm(dim=1).max().item() - 1) < 1e-5
