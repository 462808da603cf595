"""Preprocessing throughput per modality (files/s) against the decode floor of the same library, same files.

Preprocessing runs once per sample on the critical path of training and evaluation, so it should cost little
more than decoding does. For each input type we write N local files (photo-like 224x224 PNG and JPEG;
5 s 44.1 kHz stereo WAV and FLAC; 3 s 30 fps 224x224 H.264 MP4; 8192x3 .npy clouds and .ply meshes) and time,
in the same run and interleaved so machine load hits every stage alike:

* the floor: the decoding library alone reading each file fully (PIL, soundfile, PyAV, numpy, trimesh);
* `mmcompose.io`'s loader (validation, orientation, channel mixing, resampling, frame picking, sampling);
* the full processor (loader + resize / length fitting / normalisation into the encoder's tensor).

Each number is the median of `--repeats` passes over all files, after a warm-up pass over a few of them.
BLAS and OpenMP run on one thread (as in a DataLoader worker, where parallelism comes from the workers;
override with OMP_NUM_THREADS / OPENBLAS_NUM_THREADS): on tiny per-file arrays, more threads mostly measure
thread wake-ups, and on a busy machine they make the same code 5-10x slower, hiding what the code costs.
Video has two floors: decoding every frame (the loader must, to find the frames nearest its time targets),
and that plus the RGB conversion of the 8 frames the processor keeps, which is the least any sampler pays.
Prints a table and appends it to benchmarks/RESULTS.md. Run: `python benchmarks/preprocess.py [--files N]`.
"""

from __future__ import annotations

import os

# One thread unless told otherwise (see above); BLAS and OpenMP read these when numpy and torch load.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import argparse
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import av
import numpy as np
import soundfile as sf
import torch
import trimesh
from PIL import Image
from report import publish

from mmcompose.io import load_audio, load_image, load_points, load_video
from mmcompose.io.video import uniform_indices
from mmcompose.modalities.clip import CLIPPixelProcessor
from mmcompose.modalities.processors import AudioProcessor, ImageProcessor, PointProcessor, VideoProcessor

SIDE = 224
AUDIO_RATE, AUDIO_SECONDS = 44100, 5
VIDEO_FPS, VIDEO_SECONDS = 30, 3
NUM_POINTS = 8192
WARM_UP_FILES = 5


@dataclass(frozen=True)
class Stage:
    """One way of turning a file into an array; `floor` stages are what the others are compared with."""

    label: str
    run: Callable[[Path], Any]
    floor: bool = False


# --- inputs --------------------------------------------------------------------------------------------
def photo(rng: np.random.Generator, side: int = SIDE) -> np.ndarray:
    """Smooth colour fields plus grain: compresses like a photo (white noise would make PNG and H.264
    unrealistically large and slow)."""
    coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((side, side), Image.BICUBIC), dtype=np.float32)
    return np.clip(smooth + rng.normal(0.0, 6.0, smooth.shape), 0, 255).astype(np.uint8)


def write_images(root: Path, count: int, rng: np.random.Generator) -> dict[str, list[Path]]:
    files: dict[str, list[Path]] = {"png": [], "jpeg": []}
    for index in range(count):
        image = Image.fromarray(photo(rng))
        files["png"].append(root / f"image{index}.png")
        files["jpeg"].append(root / f"image{index}.jpg")
        image.save(files["png"][-1])
        image.save(files["jpeg"][-1], quality=90)
    return files


def write_audio(root: Path, count: int, rng: np.random.Generator) -> dict[str, list[Path]]:
    """Chords plus noise, 16-bit: what recorded clips look like to a decoder."""
    files: dict[str, list[Path]] = {"wav": [], "flac": []}
    time_axis = np.arange(AUDIO_RATE * AUDIO_SECONDS) / AUDIO_RATE
    for index in range(count):
        tones = rng.uniform(80, 2000, (2, 3))
        wave = sum(0.2 * np.sin(2 * np.pi * tones[:, k, None] * time_axis) for k in range(3))
        wave = (wave + rng.normal(0, 0.02, wave.shape)).T.clip(-1, 1)
        for kind in ("wav", "flac"):
            files[kind].append(root / f"audio{index}.{kind}")
            sf.write(files[kind][-1], wave, AUDIO_RATE, subtype="PCM_16")
    return files


def write_videos(root: Path, count: int, rng: np.random.Generator) -> dict[str, list[Path]]:
    """A camera panning over a photo-like scene, libx264 with its default settings (yuv420p)."""
    files: dict[str, list[Path]] = {"mp4": []}
    frames = VIDEO_FPS * VIDEO_SECONDS
    for index in range(count):
        scene = photo(rng, 2 * SIDE)
        path = root / f"video{index}.mp4"
        with av.open(str(path), "w") as container:
            stream = container.add_stream("libx264", rate=VIDEO_FPS)
            stream.width = stream.height = SIDE
            stream.pix_fmt = "yuv420p"
            for step in range(frames):
                offset = step * SIDE // frames
                frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(scene[offset:offset + SIDE,
                                                                              offset:offset + SIDE]), format="rgb24")
                container.mux(stream.encode(frame))
            container.mux(stream.encode())
        files["mp4"].append(path)
    return files


def write_points(root: Path, count: int, rng: np.random.Generator) -> dict[str, list[Path]]:
    """Noisy ellipsoid surfaces as .npy clouds, and jittered icospheres (642 vertices) as binary .ply meshes."""
    files: dict[str, list[Path]] = {"npy": [], "ply": []}
    for index in range(count):
        directions = rng.normal(size=(NUM_POINTS, 3))
        directions /= np.linalg.norm(directions, axis=1, keepdims=True)
        cloud = directions * rng.uniform(0.5, 2.0, 3) + rng.normal(0, 0.01, (NUM_POINTS, 3))
        files["npy"].append(root / f"points{index}.npy")
        np.save(files["npy"][-1], cloud.astype(np.float32))
        mesh = trimesh.creation.icosphere(subdivisions=3)
        mesh.vertices = mesh.vertices * rng.uniform(0.5, 2.0, 3) + rng.normal(0, 0.02, mesh.vertices.shape)
        files["ply"].append(root / f"mesh{index}.ply")
        mesh.export(files["ply"][-1], file_type="ply")
    return files


# --- floors ----------------------------------------------------------------------------------------------
def pil_floor(path: Path) -> Image.Image:
    return Image.open(path).convert("RGB")


def soundfile_floor(path: Path) -> np.ndarray:
    return sf.read(path, dtype="float32")[0]


def pyav_all_frames(path: Path) -> int:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"  # as the loader decodes; the floor gets the library's fastest setting too
        return sum(1 for _ in container.decode(stream))


def pyav_sampled_rgb(path: Path, num_frames: int = 8) -> list[np.ndarray]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        frames = list(container.decode(stream))
    return [frames[i].to_ndarray(format="rgb24") for i in uniform_indices(len(frames), num_frames)]


def trimesh_floor(path: Path) -> trimesh.Trimesh:
    return trimesh.load(str(path), file_type="ply", process=False)


# --- measurement -----------------------------------------------------------------------------------------
def measure(files: list[Path], stages: list[Stage], repeats: int) -> dict[str, float]:
    """Median seconds per pass over `files` for each stage; passes interleave stages so load drifts hit all."""
    for stage in stages:
        for path in files[:WARM_UP_FILES]:
            stage.run(path)
    passes: dict[str, list[float]] = {stage.label: [] for stage in stages}
    for _ in range(repeats):
        for stage in stages:
            start = time.perf_counter()
            for path in files:
                stage.run(path)
            passes[stage.label].append(time.perf_counter() - start)
    return {label: statistics.median(times) for label, times in passes.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=200, help="Files per input type.")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--results", type=Path, default=Path(__file__).with_name("RESULTS.md"))
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    image, audio, video, point = ImageProcessor(), AudioProcessor(), VideoProcessor(), PointProcessor()
    clip = CLIPPixelProcessor()
    load_average = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="mmcompose-preprocess-") as scratch:
        root = Path(scratch)
        started = time.perf_counter()
        files = {**write_images(root, args.files, rng), **write_audio(root, args.files, rng),
                 **write_videos(root, args.files, rng), **write_points(root, args.files, rng)}
        print(f"wrote {sum(map(len, files.values()))} files in {time.perf_counter() - started:.0f} s", file=sys.stderr)
        sizes = {kind: statistics.mean(p.stat().st_size for p in paths) / 1024 for kind, paths in files.items()}
        image_stages = [Stage("PIL open + convert RGB", pil_floor, floor=True),
                        Stage("io.load_image", load_image),
                        Stage("ImageProcessor() (32 px)", image),
                        Stage("CLIPPixelProcessor() (224 px)", clip)]
        audio_stages = [Stage("soundfile.read (float32)", soundfile_floor, floor=True),
                        Stage("io.load_audio (mono, 16 kHz)", load_audio),
                        Stage("AudioProcessor() (1 s at 16 kHz)", audio)]
        point_stages = [Stage("io.load_points (512)", load_points), Stage("PointProcessor() (512)", point)]
        plan = {
            "png": image_stages,
            "jpeg": image_stages,
            "wav": audio_stages,
            "flac": audio_stages,
            "mp4": [Stage("PyAV decode every frame", pyav_all_frames, floor=True),
                    Stage("PyAV decode every frame + RGB of 8", pyav_sampled_rgb, floor=True),
                    Stage("io.load_video (8 frames)", load_video),
                    Stage("VideoProcessor() (8 x 32 px)", video)],
            "npy": [Stage("np.load", np.load, floor=True), *point_stages],
            "ply": [Stage("trimesh.load", trimesh_floor, floor=True), *point_stages],
        }
        results = {kind: measure(files[kind], stages, args.repeats) for kind, stages in plan.items()}
        elapsed = time.perf_counter() - started

    descriptions = {
        "png": f"{SIDE}x{SIDE} RGB PNG", "jpeg": f"{SIDE}x{SIDE} RGB JPEG q90",
        "wav": f"{AUDIO_SECONDS} s {AUDIO_RATE} Hz stereo 16-bit WAV", "flac": f"{AUDIO_SECONDS} s {AUDIO_RATE} Hz "
        "stereo 16-bit FLAC", "mp4": f"{VIDEO_SECONDS} s {VIDEO_FPS} fps {SIDE}x{SIDE} H.264 (libx264 defaults)",
        "npy": f"{NUM_POINTS}x3 float32 .npy", "ply": "642-vertex 1280-face binary .ply mesh",
    }
    command = "python benchmarks/preprocess.py" + (f" --files {args.files}" if args.files != 200 else "") \
        + (f" --repeats {args.repeats}" if args.repeats != 3 else "")
    lines = [
        f"## preprocess ({date.today().isoformat()})",
        "",
        f"- command: `{command}` ({elapsed:.0f} s including writing the files)",
        f"- machine: {platform.machine()}, {os.cpu_count()} cores, load average {load_average:.1f} at the start; "
        f"torch {torch.__version__}, PyAV {av.__version__} (FFmpeg {av.ffmpeg_version_info}), soundfile "
        f"{sf.__version__}; torch {torch.get_num_threads()} thread(s), OPENBLAS_NUM_THREADS="
        f"{os.environ['OPENBLAS_NUM_THREADS']}, FFmpeg decoding with its own threads",
        "- files: " + "; ".join(f"{len(files[k])} x {descriptions[k]} ({sizes[k]:.0f} KiB)" for k in plan),
        f"- files/s: median of {args.repeats} passes over all files after a warm-up; `x floor` is time per file "
        "relative to the first floor row of the same input (the second video floor has its own ratio in brackets)",
        "",
        "| input | stage | files/s | x floor |",
        "|---|---|---:|---:|",
    ]
    for kind, stages in plan.items():
        floors = [results[kind][s.label] for s in stages if s.floor]
        for stage in stages:
            seconds = results[kind][stage.label]
            ratio = f"{seconds / floors[0]:.2f}"
            if len(floors) > 1 and stage.label != stages[0].label:
                ratio += f" [{seconds / floors[1]:.2f}]"
            lines.append(f"| {kind} | {stage.label} | {len(files[kind]) / seconds:,.1f} | {ratio} |")
    publish(lines, args.results)


if __name__ == "__main__":
    main()
