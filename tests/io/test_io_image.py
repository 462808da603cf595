from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image, ImageFile

from mmcompose.errors import InputError
from mmcompose.io import load_image
from tests.io.media import png_header_only

RED = (255, 0, 0)


def red_image(mode: str = "RGB", size: tuple[int, int] = (32, 24)) -> Image.Image:
    return Image.new(mode, size, RED)


@pytest.mark.parametrize(
    ("fmt", "ext", "tolerance"),
    [("PNG", "png", 0), ("JPEG", "jpg", 3), ("WEBP", "webp", 3), ("GIF", "gif", 0), ("BMP", "bmp", 0)],
)
def test_formats_keep_red_red(tmp_path: Path, fmt: str, ext: str, tolerance: int) -> None:
    path = tmp_path / f"red.{ext}"
    red_image().save(path, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    out = load_image(path)
    assert out.shape == (24, 32, 3) and out.dtype == np.uint8 and out.flags.c_contiguous
    assert np.abs(out.astype(int) - np.array(RED)).max() <= tolerance


def test_grayscale_and_bilevel(tmp_path: Path) -> None:
    Image.new("L", (5, 4), 77).save(tmp_path / "gray.png")
    Image.new("1", (5, 4), 1).save(tmp_path / "bits.png")
    assert (load_image(tmp_path / "gray.png") == 77).all()
    assert load_image(tmp_path / "gray.png").shape == (4, 5, 3)
    assert (load_image(tmp_path / "bits.png") == 255).all()


def test_alpha_is_composited_on_white(tmp_path: Path) -> None:
    Image.new("RGBA", (4, 4), (255, 0, 0, 0)).save(tmp_path / "clear.png")
    Image.new("RGBA", (4, 4), (255, 0, 0, 255)).save(tmp_path / "opaque.png")
    Image.new("RGBA", (4, 4), (0, 0, 0, 128)).save(tmp_path / "half.png")
    Image.new("LA", (4, 4), (0, 0)).save(tmp_path / "la.png")
    assert (load_image(tmp_path / "clear.png") == 255).all()
    assert (load_image(tmp_path / "opaque.png") == RED).all()
    assert (load_image(tmp_path / "half.png") == 127).all()  # 255 * (255 - 128) / 255
    assert (load_image(tmp_path / "la.png") == 255).all()


def test_palette_with_and_without_transparency(tmp_path: Path) -> None:
    palette = red_image().convert("P")
    palette.save(tmp_path / "p.png")
    assert (load_image(tmp_path / "p.png") == RED).all()
    clear = Image.new("P", (4, 4), 0)
    clear.putpalette([0, 0, 0] * 256)
    clear.info["transparency"] = 0
    clear.save(tmp_path / "pt.png", transparency=0)
    assert (load_image(tmp_path / "pt.png") == 255).all()


def test_sixteen_bit_is_scaled_not_clipped(tmp_path: Path) -> None:
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    out = load_image(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    assert out[0, :, 0].tolist() == [0, 1, 128, 255]
    as_int32 = Image.fromarray(values.astype(np.int32), mode="I")
    assert load_image(as_int32)[0, :, 1].tolist() == [0, 1, 128, 255]
    assert load_image(values)[0, :, 2].tolist() == [0, 1, 128, 255]


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    stored = np.zeros((20, 40, 3), np.uint8)
    stored[:, :20] = RED  # left half red, right half blue, stored landscape
    stored[:, 20:] = (0, 0, 255)
    image = Image.fromarray(stored)
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    image.save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    out = load_image(tmp_path / "rotated.jpg")
    assert out.shape == (40, 20, 3)  # displayed portrait
    assert out[:15, :, 0].mean() > 240 and out[:15, :, 2].mean() < 15  # the left side is now on top
    assert out[-15:, :, 2].mean() > 240


def test_gif_uses_first_frame(tmp_path: Path) -> None:
    frames = [red_image(), Image.new("RGB", (32, 24), (0, 0, 255))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=100)
    assert (load_image(tmp_path / "anim.gif") == RED).all()


def test_pil_image_input() -> None:
    out = load_image(red_image("RGBA"))
    assert out.shape == (24, 32, 3) and (out == RED).all()


@pytest.mark.parametrize(
    ("array", "expected"),
    [
        (np.full((3, 4, 3), 0.5, np.float32), 128),
        (np.full((3, 4), 1.0, np.float64), 255),
        (np.full((3, 4, 1), 200, np.uint8), 200),
        (np.ones((3, 4), bool), 255),
        (np.full((3, 4, 3), 9, np.int64), 9),
        (np.full((3, 4, 4), 1.0, np.float32), 255),
    ],
)
def test_arrays(array: np.ndarray, expected: int) -> None:
    out = load_image(array)
    assert out.shape == (3, 4, 3) and out.dtype == np.uint8 and (out == expected).all()


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (np.zeros((3, 8, 8), np.float32), "got (3, 8, 8)"),
        (np.zeros((1, 8, 8, 3), np.uint8), "got (1, 8, 8, 3)"),
        (np.zeros(8, np.uint8), "got (8,)"),
        (np.zeros((0, 8, 3), np.uint8), "zero size"),
        (np.full((4, 4, 3), 200.0), "divide by 255"),
        (np.full((4, 4, 3), np.nan), "NaN or infinite"),
        (np.full((4, 4, 3), np.inf, np.float32), "NaN or infinite"),
        (np.full((4, 4, 3), -3, np.int16), "0..255"),
        (np.full((4, 4, 3), "x", object), "dtype object"),
    ],
)
def test_bad_arrays(array: np.ndarray, message: str) -> None:
    with pytest.raises(InputError, match=r"^image array: ") as info:
        load_image(array)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_pixel_limit_on_arrays() -> None:
    with pytest.raises(InputError, match="above max_pixels=100"):
        load_image(np.zeros((20, 20, 3), np.uint8), max_pixels=100)


@pytest.mark.parametrize(("size", "message"), [(20000, "400000000 pixels"), (8000, "8000x8000 = 64,000,000")])
def test_bomb_header_refused_without_allocating(tmp_path: Path, size: int, message: str,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "bomb.png"
    path.write_bytes(png_header_only(size, size))

    def no_decoding(*args: object, **kwargs: object) -> None:
        raise AssertionError("the pixels were decoded: the header alone must refuse this file")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    tracemalloc.start()
    try:
        with pytest.raises(InputError, match="decompression-bomb guard") as info:
            load_image(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert message in str(info.value) and str(info.value).startswith(f"{path}: ")
    assert peak < 5_000_000  # decoding even a 8000x8000 RGB image would allocate 192 MB


def test_truncated_png(tmp_path: Path) -> None:
    red_image(size=(64, 64)).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "stub.png").write_bytes(data[:40])  # header intact, no image data
    with pytest.raises(InputError, match=r"cut\.png: cannot decode image \(.*truncated"):
        load_image(tmp_path / "cut.png")
    with pytest.raises(InputError, match=r"stub\.png: truncated or corrupt PNG data \(cannot identify"):
        load_image(tmp_path / "stub.png")


def test_bad_files(tmp_path: Path) -> None:
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "noise.png").write_bytes(np.random.default_rng(0).integers(0, 256, 500, np.uint8).tobytes())
    sf.write(tmp_path / "sound.png", np.zeros(100), 8000, format="WAV")  # mislabelled
    red_image().save(tmp_path / "picture.tiff")  # real image, format we do not decode
    cases = {
        tmp_path / "empty.png": "empty file",
        tmp_path / "missing.png": "no such file",
        tmp_path: "is a directory",
        tmp_path / "noise.png": "not a supported image format",
        tmp_path / "sound.png": "not a supported image format",
        tmp_path / "picture.tiff": "not a supported image format",
    }
    for path, message in cases.items():
        with pytest.raises(InputError) as info:
            load_image(path)
        assert str(info.value).startswith(f"{path}: ") and message in str(info.value)
