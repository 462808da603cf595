"""Renderers (entity + noise stream -> array) and writers (array -> a real media file).

Each renderer reads only its own modality's latent code, and adds per-sample variation (phase, position,
rotation, jitter, noise), so identity is learnable from that modality alone, no two renderings are equal, and
no modality is a transform of another. Attribute values play no part in rendering: what an entity *is like*
has to come from the LLM's knowledge, never from the pixels or the sound.
"""

from __future__ import annotations

import colorsys
import io
from pathlib import Path

import av
import numpy as np
import soundfile
from PIL import Image

from mmcompose.world.entities import Entity

IMAGE_SIZE = 32
SAMPLE_RATE = 16_000
AUDIO_SAMPLES = SAMPLE_RATE
VIDEO_FRAMES = 8
VIDEO_FPS = 8
NUM_POINTS = 512

MEDIA_EXTENSIONS: dict[str, str] = {"image": "png", "audio": "wav", "video": "mp4", "point": "npy"}


def _rgb(hue: float, saturation: float, value: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(hue % 1.0, saturation, value), dtype=np.float64)


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)


def render_image(entity: Entity, rng: np.random.Generator) -> np.ndarray:
    """A 32x32 RGB uint8 image: a soft two-colour pattern (stripes, checks or rings) from the image latent.

    Per sample: the pattern's phase (position), a small rotation, a colour gain jitter and pixel noise.
    """
    z = entity.latents["image"]
    background = _rgb(z[0], 0.35 + 0.6 * z[1], 0.25 + 0.6 * z[2])
    foreground = _rgb(z[0] + 0.25 + 0.5 * z[3], 0.45 + 0.55 * z[4], 0.45 + 0.55 * z[5])
    theta = np.pi * z[6] + rng.normal(0.0, 0.08)
    frequency = (1.5 + 3.0 * z[7]) * 2.0 * np.pi / IMAGE_SIZE
    kind = int(z[8] * 3)
    ys, xs = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float64)
    u = np.cos(theta) * xs + np.sin(theta) * ys
    v = -np.sin(theta) * xs + np.cos(theta) * ys
    phase = rng.uniform(0.0, 2.0 * np.pi, size=2)
    if kind == 0:
        wave = np.sin(frequency * u + phase[0])
    elif kind == 1:
        wave = np.sin(frequency * u + phase[0]) * np.sin(frequency * v + phase[1])
    else:
        centre = IMAGE_SIZE / 2 + rng.uniform(-6.0, 6.0, size=2)
        wave = np.sin(frequency * np.hypot(xs - centre[0], ys - centre[1]) + phase[0])
    mix = 1.0 / (1.0 + np.exp(-4.0 * wave))
    image = background * (1.0 - mix[..., None]) + foreground * mix[..., None]
    image = image * rng.uniform(0.88, 1.12, size=3) + rng.normal(0.0, 0.04, size=image.shape)
    return _to_uint8(image)


def render_audio(entity: Entity, rng: np.random.Generator) -> np.ndarray:
    """One second of float32 mono audio in [-1, 1] at 16 kHz: three tones under an amplitude modulation.

    The tones' pitches and loudness and the modulation's rate and depth come from the audio latent.
    Per sample: slight detuning, random phases, a random gain and white noise.
    """
    z = entity.latents["audio"]
    t = np.arange(AUDIO_SAMPLES, dtype=np.float64) / SAMPLE_RATE
    pitches = 160.0 * 2.0 ** (4.2 * np.asarray(z[0:3])) * (1.0 + rng.normal(0.0, 0.006, size=3))
    loudness = 0.25 + 0.75 * np.asarray(z[3:6])
    tone = np.sin(2.0 * np.pi * pitches[:, None] * t + rng.uniform(0.0, 2.0 * np.pi, size=(3, 1)))
    signal = (loudness[:, None] * tone).sum(axis=0)
    rate, depth = 1.0 + 9.0 * z[6], 0.2 + 0.7 * z[7]
    envelope = 1.0 - depth * (0.5 + 0.5 * np.sin(2.0 * np.pi * rate * t + rng.uniform(0.0, 2.0 * np.pi)))
    signal = signal * envelope
    signal = signal / np.max(np.abs(signal)) * rng.uniform(0.4, 0.8)
    signal = signal + rng.normal(0.0, rng.uniform(0.01, 0.05), size=AUDIO_SAMPLES)
    return np.clip(signal, -1.0, 1.0).astype(np.float32)


def render_video(entity: Entity, rng: np.random.Generator) -> np.ndarray:
    """Eight 32x32 RGB uint8 frames: a shape moving at a constant velocity (wrapping at the borders) and
    blinking with a period, over a plain background; colours, shape, size, velocity and period come from the
    video latent. Per sample: start position, blink phase, a brightness jitter and pixel noise."""
    z = entity.latents["video"]
    background = _rgb(z[0], 0.3 + 0.6 * z[1], 0.2 + 0.5 * z[2])
    foreground = _rgb(z[0] + 0.3 + 0.4 * z[3], 0.5 + 0.5 * z[4], 0.6 + 0.4 * z[5])
    radius = 3.0 + 5.0 * z[6]
    velocity = (np.array([z[7], z[8]]) - 0.5) * 7.0
    shape = int(z[9] * 3)
    period = 2 + int(z[10] * 3)
    start = rng.uniform(0.0, IMAGE_SIZE, size=2)
    blink_phase = int(rng.integers(period))
    ys, xs = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float64)
    frames = np.empty((VIDEO_FRAMES, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.float64)
    for f in range(VIDEO_FRAMES):
        cx, cy = (start + f * velocity) % IMAGE_SIZE
        dx = (xs - cx + IMAGE_SIZE / 2) % IMAGE_SIZE - IMAGE_SIZE / 2
        dy = (ys - cy + IMAGE_SIZE / 2) % IMAGE_SIZE - IMAGE_SIZE / 2
        if shape == 0:
            inside = np.hypot(dx, dy) <= radius
        elif shape == 1:
            inside = np.maximum(np.abs(dx), np.abs(dy)) <= radius
        else:
            inside = np.abs(dx) + np.abs(dy) <= radius * 1.3
        lit = 1.0 if (f + blink_phase) % period else 0.45
        frames[f] = np.where(inside[..., None], foreground * lit, background)
    frames = frames * rng.uniform(0.88, 1.12) + rng.normal(0.0, 0.03, size=frames.shape)
    return _to_uint8(frames)


def render_point(entity: Entity, rng: np.random.Generator) -> np.ndarray:
    """512 xyz float32 points from a mixture of three primitives (blob, ring, vertical segment) whose
    placement, size and weight come from the point latent. Per sample: which points fall where, a small
    rotation about the z axis (objects stand upright and face roughly one way, as in ModelNet), a small scale
    change and jitter."""
    z = np.asarray(entity.latents["point"]).reshape(-1)
    weights = 0.2 + z[0:3]
    counts = rng.multinomial(NUM_POINTS, weights / weights.sum())
    parts = []
    for j, count in enumerate(counts):
        kind, radial, height, size, angle = z[3 + j], z[6 + j], z[9 + j], z[12 + j], 2.0 * np.pi * j / 3
        centre = np.array([0.7 * radial * np.cos(angle), 0.7 * radial * np.sin(angle), 1.4 * height - 0.7])
        scale = 0.05 + 0.25 * size
        if kind < 1 / 3:
            offsets = rng.normal(0.0, scale, size=(count, 3))
        elif kind < 2 / 3:
            phi = rng.uniform(0.0, 2.0 * np.pi, size=count)
            offsets = np.stack([2 * scale * np.cos(phi), 2 * scale * np.sin(phi), np.zeros(count)], axis=1)
        else:
            offsets = np.stack([np.zeros(count), np.zeros(count), rng.uniform(-3 * scale, 3 * scale, count)], 1)
        parts.append(centre + offsets)
    points = np.concatenate(parts, axis=0)
    rotation = rng.uniform(-0.25, 0.25)
    c, s = np.cos(rotation), np.sin(rotation)
    points = points @ np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]]).T
    points = points * rng.uniform(0.95, 1.05) + rng.normal(0.0, 0.01, size=points.shape)
    return points[rng.permutation(NUM_POINTS)].astype(np.float32)


RENDERERS = {"image": render_image, "audio": render_audio, "video": render_video, "point": render_point}


def write_image(path: Path, image: np.ndarray) -> None:
    """Save a (32, 32, 3) uint8 image as PNG."""
    Image.fromarray(image).save(path, format="PNG")


def write_audio(path: Path, audio: np.ndarray) -> None:
    """Save float audio in [-1, 1] as a 16 kHz mono 16-bit PCM WAV file (encoded in memory, written once)."""
    buffer = io.BytesIO()
    soundfile.write(buffer, audio, SAMPLE_RATE, subtype="PCM_16", format="WAV")
    path.write_bytes(buffer.getvalue())


def write_video(path: Path, frames: np.ndarray) -> None:
    """Save (T, 32, 32, 3) uint8 frames as H.264 (yuv420p, lossless quantiser) in MP4, 8 frames per second.

    One encoder thread keeps the bytes reproducible; the only loss is yuv420p's chroma subsampling.
    """
    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=VIDEO_FPS)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"qp": "0"}
        stream.codec_context.thread_count = 1
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def write_point(path: Path, points: np.ndarray) -> None:
    """Save (512, 3) float32 points as a NumPy .npy file."""
    np.save(path, points, allow_pickle=False)


WRITERS = {"image": write_image, "audio": write_audio, "video": write_video, "point": write_point}
