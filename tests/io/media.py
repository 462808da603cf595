"""Helpers that write real media files with real encoders (libsndfile, FFmpeg via PyAV) or craft headers."""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable, Sequence
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

VIDEO_SIZE = (64, 48)  # width, height
BRIGHTNESS_STEP = 8


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header_only(width: int, height: int) -> bytes:
    """A syntactically valid PNG that claims width x height but carries almost no pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + png_chunk(b"IEND", b"")
    )


def wav_header(frames: int, rate: int = 16000, channels: int = 1, bits: int = 16) -> bytes:
    """A PCM WAV header whose data chunk claims `frames` frames."""
    align = channels * bits // 8
    data = frames * align
    fmt = struct.pack("<HHIIHH", 1, channels, rate, rate * align, align, bits)
    return (
        b"RIFF"
        + struct.pack("<I", 36 + data)
        + b"WAVE"
        + b"fmt "
        + struct.pack("<I", 16)
        + fmt
        + (b"data" + struct.pack("<I", data))
    )


def sine(freq: float, rate: int, seconds: float, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(round(rate * seconds)) / rate
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def encode_video(
    path: Path,
    codec: str,
    num_frames: int,
    *,
    fps: int = 10,
    container_format: str | None = None,
    pts_ms: Sequence[int] | None = None,
    rotation: int | None = None,
    frame_fn: Callable[[int], np.ndarray] | None = None,
    seekable: bool = True,
) -> Path:
    """Encode frames whose brightness is `i * BRIGHTNESS_STEP` (or `frame_fn(i)`) with a real encoder.

    `pts_ms` gives explicit presentation times in milliseconds (variable frame rate). `seekable=False` muxes
    into a pipe-like stream, so the muxer cannot go back to write durations, frame counts or indexes.
    """
    width, height = VIDEO_SIZE
    sink = _Pipe() if not seekable else None
    with av.open(sink or str(path), "w", format=container_format) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if pts_ms is not None:
            stream.codec_context.time_base = Fraction(1, 1000)
        if rotation is not None:
            stream.set_display_rotation(rotation)
        for i in range(num_frames):
            image = frame_fn(i) if frame_fn else np.full((height, width, 3), i * BRIGHTNESS_STEP, np.uint8)
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            if pts_ms is not None:
                frame.pts, frame.time_base = pts_ms[i], Fraction(1, 1000)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    if sink is not None:
        path.write_bytes(bytes(sink.data))
    return path


class _Pipe(io.RawIOBase):
    """A write-only, non-seekable byte sink, like a pipe."""

    def __init__(self) -> None:
        self.data = bytearray()

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def write(self, chunk: bytes) -> int:  # type: ignore[override]
        self.data += bytes(chunk)
        return len(chunk)


def frame_indices(video: np.ndarray) -> list[int]:
    """Recover which source frame each output frame was, from its brightness."""
    return [round(float(frame.mean()) / BRIGHTNESS_STEP) for frame in video]
