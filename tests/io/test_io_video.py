from __future__ import annotations

from multiprocessing import get_context
from multiprocessing.connection import Connection
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from mmcompose.errors import InputError
from mmcompose.io import load_video
from mmcompose.io.video import uniform_indices
from tests.io.media import BRIGHTNESS_STEP, VIDEO_SIZE, encode_video, frame_indices

WIDTH, HEIGHT = VIDEO_SIZE
CODECS = [
    ("mp4", "libx264", None),
    ("webm", "libvpx-vp9", None),
    ("webm", "libvpx", None),  # VP8
    ("avi", "mpeg4", None),
    ("mkv", "ffv1", "matroska"),
]


def expected(count: int, num: int) -> list[int]:
    return [round(x) for x in np.linspace(0, count - 1, num)]


@pytest.mark.parametrize(("ext", "codec", "fmt"), CODECS)
def test_uniform_sampling_by_brightness(tmp_path: Path, ext: str, codec: str, fmt: str | None) -> None:
    if codec not in av.codecs_available:
        pytest.skip(f"{codec} not in this PyAV build")
    path = encode_video(tmp_path / f"ramp.{ext}", codec, 30, container_format=fmt)
    video = load_video(path, num_frames=8)
    assert video.shape == (8, HEIGHT, WIDTH, 3) and video.dtype == np.uint8
    assert frame_indices(video) == expected(30, 8) == [0, 4, 8, 12, 17, 21, 25, 29]


def test_fewer_frames_than_requested_repeats_in_order(tmp_path: Path) -> None:
    path = encode_video(tmp_path / "short.mp4", "libx264", 3)
    video = load_video(path, num_frames=8)
    assert video.shape == (8, HEIGHT, WIDTH, 3)
    assert frame_indices(video) == [0, 0, 1, 1, 1, 1, 2, 2]


def test_variable_frame_rate_samples_by_time(tmp_path: Path) -> None:
    times = [0, 100, 200, 1000, 1100, 2000]  # ms
    path = encode_video(tmp_path / "vfr.mp4", "libx264", len(times), pts_ms=times)
    video = load_video(path, num_frames=5)  # targets 0, 0.5, 1.0, 1.5, 2.0 s
    assert frame_indices(video) == [0, 2, 3, 4, 5]  # by index it would be [0, 1, 2, 4, 5]


def test_missing_duration_metadata(tmp_path: Path) -> None:
    path = encode_video(tmp_path / "live.mkv", "libvpx-vp9", 12, container_format="matroska", seekable=False)
    with av.open(str(path)) as container:
        assert container.duration is None and container.streams.video[0].duration is None
    assert frame_indices(load_video(path, num_frames=4)) == expected(12, 4)
    with pytest.raises(InputError, match=r"live\.mkv: video lasts more than max_seconds=0\.5"):
        load_video(path, max_seconds=0.5)  # caught while demuxing, since no duration is stated


def test_single_frame_video(tmp_path: Path) -> None:
    video = load_video(encode_video(tmp_path / "one.webm", "libvpx-vp9", 1), num_frames=3)
    assert video.shape == (3, HEIGHT, WIDTH, 3) and frame_indices(video) == [0, 0, 0]


def test_display_rotation_is_applied(tmp_path: Path) -> None:
    def left_red(_: int) -> np.ndarray:
        image = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
        image[:, : WIDTH // 2, 0] = 255
        return image

    path = encode_video(tmp_path / "phone.mp4", "libx264", 2, rotation=-90, frame_fn=left_red)
    video = load_video(path, num_frames=1)
    assert video.shape == (1, WIDTH, HEIGHT, 3)  # shown portrait
    top, bottom = video[0, : WIDTH // 2 - 4], video[0, WIDTH // 2 + 4 :]
    assert top[..., 0].mean() > 200 and bottom[..., 0].mean() < 30  # rotated clockwise: left side on top


def test_frame_directory_natural_order(tmp_path: Path) -> None:
    for i in range(12):
        Image.new("L", (16, 8), i * BRIGHTNESS_STEP).save(tmp_path / f"frame_{i}.png")
    (tmp_path / "notes.txt").write_text("not a frame")
    video = load_video(tmp_path, num_frames=4)
    assert video.shape == (4, 8, 16, 3) and frame_indices(video) == expected(12, 4)


def test_frame_list_and_array(tmp_path: Path) -> None:
    frames = [np.full((8, 16, 3), i * BRIGHTNESS_STEP, np.uint8) for i in range(5)]
    paths = []
    for i, frame in enumerate(frames):
        paths.append(tmp_path / f"{i}.jpg")
        Image.fromarray(frame).save(paths[-1], quality=95)
    assert frame_indices(load_video(frames, num_frames=3)) == [0, 2, 4]
    assert frame_indices(load_video(paths, num_frames=3)) == [0, 2, 4]
    assert frame_indices(load_video(np.stack(frames), num_frames=7)) == expected(5, 7)


def test_uniform_indices() -> None:
    assert uniform_indices(30, 8).tolist() == expected(30, 8)
    assert uniform_indices(1, 4).tolist() == [0, 0, 0, 0]
    assert uniform_indices(4, 1).tolist() == [0]
    assert uniform_indices(2, 3).tolist() == [0, 0, 1]  # the tie at 0.5 goes to the earlier frame


def test_bad_frame_sequences(tmp_path: Path) -> None:
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(InputError, match="directory contains no frame images"):
        load_video(tmp_path / "empty_dir")
    with pytest.raises(InputError, match="empty frame sequence"):
        load_video([])
    mixed = [np.zeros((8, 8, 3), np.uint8), np.zeros((8, 9, 3), np.uint8)]
    with pytest.raises(InputError, match=r"video frames\[1\]: frame is 9x8 but video frames\[0\] is 8x8"):
        load_video(mixed, num_frames=2)
    with pytest.raises(InputError, match=r"video frames\[0\]: image array: .*NaN"):
        load_video([np.full((4, 4, 3), np.nan)])
    with pytest.raises(InputError, match=r"video array: expected shape \(T, H, W, C\)"):
        load_video(np.zeros((8, 8, 3), np.uint8))


def test_limits(tmp_path: Path) -> None:
    path = encode_video(tmp_path / "ten.mp4", "libx264", 20)  # 2 s at 10 fps
    with pytest.raises(InputError, match=r"ten\.mp4: video lasts 2\.0 s, above max_seconds=1"):
        load_video(path, max_seconds=1.0)
    with pytest.raises(InputError, match=r"64x48 = 3,072 pixels, above max_pixels_per_frame=1,000"):
        load_video(path, max_pixels_per_frame=1000)


def test_bad_files(tmp_path: Path) -> None:
    good = encode_video(tmp_path / "good.mp4", "libx264", 10).read_bytes()
    (tmp_path / "cut.mp4").write_bytes(good[: len(good) // 2])  # the index (moov) is at the end: lost
    good = encode_video(tmp_path / "good.webm", "libvpx-vp9", 30).read_bytes()
    (tmp_path / "cut.webm").write_bytes(good[: len(good) // 2])  # header intact, second half of frames lost
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "noise.webm").write_bytes(np.random.default_rng(2).integers(0, 256, 900, np.uint8).tobytes())
    Image.new("RGB", (8, 8)).save(tmp_path / "picture.mp4", format="PNG")
    sf.write(tmp_path / "sound.avi", np.zeros(800), 8000, format="WAV")
    with av.open(str(tmp_path / "audio_only.mp4"), "w") as container:
        stream = container.add_stream("aac", rate=8000)
        silence = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), "fltp", "mono")
        silence.sample_rate = 8000
        for packet in [*stream.encode(silence), *stream.encode()]:
            container.mux(packet)
    with av.open(str(tmp_path / "cover_only.mp4"), "w") as container:  # a song with cover art
        audio = container.add_stream("aac", rate=8000)
        cover = container.add_stream("png", rate=1)
        cover.width, cover.height, cover.pix_fmt = 16, 16, "rgb24"
        cover.disposition = av.stream.Disposition.attached_pic
        packets = [*audio.encode(silence), *audio.encode()]
        packets += [*cover.encode(av.VideoFrame.from_ndarray(np.zeros((16, 16, 3), np.uint8), format="rgb24"))]
        for packet in [*packets, *cover.encode()]:
            container.mux(packet)
    cases = {
        tmp_path / "cover_only.mp4": "file has no video stream (only cover art)",
        tmp_path / "cut.mp4": "no media streams found (truncated or corrupt file)",
        tmp_path / "cut.webm": "truncated video (frames cover 0.",
        tmp_path / "empty.mp4": "empty file",
        tmp_path / "missing.mp4": "no such file",
        tmp_path / "noise.webm": "not a readable video file",
        tmp_path / "picture.mp4": "unsupported container 'png_pipe'",
        tmp_path / "sound.avi": "unsupported container 'wav'",
        tmp_path / "audio_only.mp4": "file has no video stream",
    }
    for path, message in cases.items():
        with pytest.raises(InputError) as info:
            load_video(path)
        assert str(info.value).startswith(f"{path}: ") and message in str(info.value), str(info.value)


def _load_in_child(path: Path, sender: Connection) -> None:
    sender.send(load_video(path, num_frames=4))


def test_a_process_forked_after_decoding_decodes_too(tmp_path: Path) -> None:
    """Eval's DataLoader workers are forked from a process that has decoded videos already; PyAV's own cached
    scaler would leave such a child waiting forever for slice threads that exist only in the parent."""
    path = encode_video(tmp_path / "ramp.mp4", "libx264", 30)
    in_parent = load_video(path, num_frames=4)
    fork = get_context("fork")
    receiver, sender = fork.Pipe(duplex=False)
    child = fork.Process(target=_load_in_child, args=(path, sender))
    child.start()
    try:
        assert receiver.poll(60), "the forked child did not decode the video within 60 s"
        np.testing.assert_array_equal(receiver.recv(), in_parent)
    finally:
        child.kill()
        child.join()
