"""Decode videos (or frame sequences) into a fixed number of uniformly time-sampled uint8 RGB frames."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import av
import numpy as np
from av.video.reformatter import VideoReformatter
from PIL import Image

from mmcompose.errors import InputError
from mmcompose.io._common import PathLike, check_file, one_line
from mmcompose.io.image import load_image

#: Demuxers (FFmpeg names) we accept: MP4/MOV, Matroska/WebM and AVI. Others are refused, not probed further.
SUPPORTED_CONTAINERS = frozenset({"mov,mp4,m4a,3gp,3g2,mj2", "matroska,webm", "avi"})
#: File suffixes picked up as frames when `source` is a directory.
FRAME_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp"})
DEFAULT_MAX_PIXELS_PER_FRAME = 7680 * 4320  # 8K UHD

FrameSource = PathLike | np.ndarray | Image.Image


def load_video(
    source: PathLike | Sequence[FrameSource] | np.ndarray,
    *,
    num_frames: int = 8,
    max_seconds: float = 3600.0,
    max_pixels_per_frame: int = DEFAULT_MAX_PIXELS_PER_FRAME,
) -> np.ndarray:
    """Load `num_frames` frames as a uint8 array of shape (num_frames, H, W, 3), RGB, in temporal order.

    `source` is a video file (MP4/MOV, WebM/MKV, AVI; any codec the installed FFmpeg decodes), a directory of
    frame images (sorted by name, numbers compared numerically so frame_10 follows frame_9), a sequence of
    images (anything `load_image` takes), or a (T, H, W, C) array.

    Sampling is uniform in *time*: the targets are `num_frames` evenly spaced instants from the first frame's
    timestamp to the last one's, and each target takes the frame whose timestamp is nearest (ties go to the
    earlier frame). This is right for variable frame rates, and for constant rates it equals picking indices
    round(linspace(0, F - 1, num_frames)); image sequences use those indices directly. A video with fewer
    frames than requested therefore repeats frames (each as often as it is the nearest), keeping order.
    Timestamps come from a cheap demux pass over the packets, so no duration metadata is needed; when the
    container does state a duration above `max_seconds` the file is refused before anything is read.
    Display rotation metadata (phone videos) is applied. Frames are scaled to the stream's first frame size
    if the resolution changes mid-stream; image sequences of mixed sizes are refused instead.
    Raises InputError with a one-line message naming the file and the cause.
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be at least 1, got {num_frames}")
    if max_seconds <= 0 or max_pixels_per_frame <= 0:
        raise ValueError("max_seconds and max_pixels_per_frame must be positive")
    if isinstance(source, np.ndarray):
        if source.ndim != 4:
            raise InputError(f"video array: expected shape (T, H, W, C), got {tuple(source.shape)}")
        return _from_images(
            list(source), [f"video array[{i}]" for i in range(len(source))], num_frames, max_pixels_per_frame
        )
    if isinstance(source, list | tuple):
        names = [str(item) if isinstance(item, str | Path) else f"video frames[{i}]" for i, item in enumerate(source)]
        return _from_images(list(source), names, num_frames, max_pixels_per_frame)
    path = Path(source)
    if path.is_dir():
        try:
            frames = sorted(
                (p for p in path.iterdir() if p.suffix.lower() in FRAME_SUFFIXES and p.is_file()), key=_natural_key
            )
        except OSError as exc:
            raise InputError(f"{path}: cannot list frame directory ({one_line(exc)})") from None
        if not frames:
            raise InputError(f"{path}: directory contains no frame images ({', '.join(sorted(FRAME_SUFFIXES))})")
        return _from_images(frames, [str(p) for p in frames], num_frames, max_pixels_per_frame)
    path = check_file(path, "video")
    return _from_container(path, str(path), num_frames, max_seconds, max_pixels_per_frame)


def uniform_indices(count: int, num: int) -> np.ndarray:
    """Indices of `num` frames spread evenly over `count` frames, first and last included (ties round down)."""
    return np.ceil(np.linspace(0, count - 1, num) - 0.5).astype(np.int64)


def _natural_key(path: Path) -> list[int | str]:
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", path.name)]


def _from_images(items: list[FrameSource], names: list[str], num_frames: int, max_pixels: int) -> np.ndarray:
    if not items:
        raise InputError("video frames: empty frame sequence")
    picks = uniform_indices(len(items), num_frames)
    decoded = {int(i): _load_frame(items[i], names[i], max_pixels) for i in np.unique(picks)}
    first = next(iter(decoded))
    for index, frame in decoded.items():
        if frame.shape != decoded[first].shape:
            raise InputError(
                f"{names[index]}: frame is {frame.shape[1]}x{frame.shape[0]} but {names[first]} is "
                f"{decoded[first].shape[1]}x{decoded[first].shape[0]}; all frames must have the same size"
            )
    return np.stack([decoded[int(i)] for i in picks])


def _load_frame(item: FrameSource, name: str, max_pixels: int) -> np.ndarray:
    try:
        return load_image(item, max_pixels=max_pixels)
    except InputError as exc:
        if isinstance(item, str | Path):
            raise  # the message already names the file
        raise InputError(f"{name}: {exc}") from None


def _from_container(path: Path, name: str, num_frames: int, max_seconds: float, max_pixels: int) -> np.ndarray:
    try:
        first, last, interval = _timestamp_range(path, name, max_seconds, max_pixels)
        targets = np.linspace(first, last, num_frames)
        with contextlib.closing(_decoded_frames(path, name, max_pixels)) as decoded:
            frames = _pick_nearest(decoded, targets, 2 * interval, name)
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"{name}: cannot decode video, corrupt or truncated ({one_line(exc)})") from None
    return np.stack(frames)


def _open(path: Path, name: str, max_pixels: int) -> tuple[av.container.InputContainer, av.VideoStream]:
    try:
        container = av.open(str(path), mode="r", metadata_errors="ignore")
    except Exception as exc:
        raise InputError(f"{name}: not a readable video file ({one_line(exc)})") from None
    try:
        if container.format.name not in SUPPORTED_CONTAINERS:
            raise InputError(f"{name}: unsupported container '{container.format.name}' (use MP4, WebM/MKV or AVI)")
        if not container.streams:
            raise InputError(f"{name}: no media streams found (truncated or corrupt file)")
        # Cover art (an "attached picture", common in MP4/MKV) is a one-frame video stream: not the video.
        moving = [s for s in container.streams.video if not s.disposition & av.stream.Disposition.attached_pic]
        if not moving:
            detail = " (only cover art)" if container.streams.video else ""
            raise InputError(f"{name}: file has no video stream{detail}")
        stream = moving[0]
        _check_pixels(stream.codec_context.width, stream.codec_context.height, name, max_pixels)
    except BaseException:
        container.close()
        raise
    return container, stream


def _check_pixels(width: int, height: int, name: str, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise InputError(
            f"{name}: video frames are {width}x{height} = {width * height:,} pixels, "
            f"above max_pixels_per_frame={max_pixels:,}"
        )


def _timestamp_range(path: Path, name: str, max_seconds: float, max_pixels: int) -> tuple[int, int, float]:
    """First and last presentation timestamps and the mean frame interval (stream time base), from the packets.

    Demuxing without decoding is cheap, and needs no duration metadata. Refuses the file as soon as the
    stated duration, or the span of timestamps seen so far, exceeds `max_seconds`; and refuses it as
    truncated when the frames stop well before the video's own stated duration.
    """
    container, stream = _open(path, name, max_pixels)
    with container:
        stated = _stated_seconds(container, stream)
        if stated is not None and stated > max_seconds:
            raise InputError(f"{name}: video lasts {stated:.1f} s, above max_seconds={max_seconds:g}")
        if stream.time_base is None or stream.time_base <= 0:
            raise InputError(f"{name}: video stream has no valid time base")
        time_base = float(stream.time_base)
        limit = max_seconds / time_base
        first = last = None
        count, last_duration = 0, 0
        for packet in container.demux(stream):
            stamp = packet.pts if packet.pts is not None else packet.dts
            if stamp is None or packet.size == 0:
                continue
            first = stamp if first is None else min(first, stamp)
            if last is None or stamp >= last:
                last, last_duration = stamp, packet.duration or 0
            count += 1
            if last - first > limit:
                raise InputError(f"{name}: video lasts more than max_seconds={max_seconds:g}")
        own_duration = stated if len(container.streams) == 1 else _stated_seconds(None, stream)
    if first is None:
        raise InputError(f"{name}: video stream has no readable frames (truncated or corrupt file)")
    interval = (last - first) / (count - 1) if count > 1 else 0.0
    # The last frame lasts its own stated duration when the container records it (a screen recording's
    # final still can last minutes); otherwise assume a typical frame interval.
    covered = (last - first + (last_duration or interval)) * time_base
    if own_duration is not None and covered < 0.9 * own_duration - interval * time_base:
        raise InputError(f"{name}: truncated video (frames cover {covered:.2f} s of the stated {own_duration:.2f} s)")
    return first, last, interval


def _stated_seconds(container: av.container.InputContainer | None, stream: av.VideoStream) -> float | None:
    """Duration from the metadata: the stream's own if stated, else the container's (which spans all streams)."""
    if stream.duration is not None and stream.time_base is not None and stream.duration > 0:
        return float(stream.duration * stream.time_base)
    if container is not None and container.duration is not None and container.duration > 0:
        return container.duration / av.time_base
    return None


def _decoded_frames(path: Path, name: str, max_pixels: int) -> Iterator[tuple[int, _LazyRGB]]:
    """Yield (timestamp, frame) for every decoded frame; RGB conversion waits until a frame is picked.

    Conversion goes through a scaler made for this video, not PyAV's (18 and later) per-thread cached one,
    `frame.to_ndarray`'s: that scaler runs its own pool of slice threads, and a process forked after using it
    (a DataLoader worker preparing eval items) inherits the scaler without the threads and waits for them
    forever on its first frame. Measured: every forked eval worker hung so; with a scaler per video none does.
    """
    container, stream = _open(path, name, max_pixels)
    with container:
        stream.thread_type = "AUTO"
        scaler = VideoReformatter()
        size = None
        for frame in container.decode(stream):
            if frame.pts is None:
                continue
            _check_pixels(frame.width, frame.height, name, max_pixels)
            size = size or (frame.width, frame.height)
            yield frame.pts, _LazyRGB(frame, size, scaler)


class _LazyRGB:
    """A decoded frame converted to RGB only if it is selected: conversion costs more than decoding."""

    def __init__(self, frame: av.VideoFrame, size: tuple[int, int], scaler: VideoReformatter) -> None:
        self.frame, self.size, self.scaler, self.array = frame, size, scaler, None

    def rgb(self) -> np.ndarray:
        if self.array is None:
            width, height = self.size
            array = self.scaler.reformat(self.frame, format="rgb24", width=width, height=height).to_ndarray()
            quarter_turns = round((self.frame.rotation or 0) / 90) % 4
            self.array = np.ascontiguousarray(np.rot90(array, k=quarter_turns))
        return self.array


def _pick_nearest(
    frames: Iterator[tuple[int, _LazyRGB]], targets: np.ndarray, slack: float, name: str
) -> list[np.ndarray]:
    """For each (sorted) target time, the frame with the nearest timestamp, in one streaming pass.

    If decoding ends more than `slack` before the last target, frames the demuxer saw failed to decode:
    the stream is truncated or corrupt, and repeating the last good frame would hide that.
    """
    picked: list[np.ndarray] = []
    previous: tuple[int, _LazyRGB] | None = None
    for stamp, frame in frames:
        while len(picked) < len(targets) and stamp >= targets[len(picked)]:
            target = targets[len(picked)]
            closer_before = previous is not None and target - previous[0] <= stamp - target
            picked.append(previous[1].rgb() if closer_before else frame.rgb())
        if len(picked) == len(targets):
            return picked
        previous = (stamp, frame)
    if previous is None or previous[0] < targets[-1] - slack:
        raise InputError(f"{name}: video frames stop decoding before the end of the stream (truncated or corrupt)")
    picked.extend(previous[1].rgb() for _ in range(len(targets) - len(picked)))
    return picked
