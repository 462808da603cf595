"""Decode image files, PIL images and arrays into uint8 RGB arrays, refusing anything unsafe or ambiguous."""

from __future__ import annotations

import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from mmcompose.errors import InputError
from mmcompose.io._common import PathLike, check_file, one_line

#: Pillow plugins we let loose on user files; every other decoder stays disabled to keep the attack surface small.
SUPPORTED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")

_SIGNATURES = {
    b"\x89PNG\r\n\x1a\n": "PNG",
    b"\xff\xd8\xff": "JPEG",
    b"GIF87a": "GIF",
    b"GIF89a": "GIF",
    b"BM": "BMP",
}
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N"}


def load_image(source: PathLike | np.ndarray | Image.Image, *, max_pixels: int = 50_000_000) -> np.ndarray:
    """Load an image as a uint8 array of shape (H, W, 3), RGB, C-contiguous.

    `source` is a path (PNG, JPEG, WebP, GIF, BMP), a PIL image or an array:

    * files and PIL images get their EXIF orientation applied, so what the model sees is what a viewer shows;
    * only the first frame of an animated GIF/WebP/PNG is used;
    * grayscale is replicated to three channels; palette images are expanded;
    * 16-bit images ("I;16*", "I" holding 0..65535, uint16 arrays) are scaled by 255/65535, not clipped;
    * transparency (RGBA, LA, PA, palette/RGB with a transparent colour) is composited on **white**,
      because transparent pixels usually store black and would otherwise turn the background black;
    * arrays may be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4): uint8, uint16, bool, other integers within
      0..255, or floats within [0, 1]; anything else (channel-first, floats in 0..255, NaN) is refused.

    `max_pixels` is a decompression-bomb guard, checked from the header before any pixel is decoded.
    Pillow's own limit (`Image.MAX_IMAGE_PIXELS`, doubled) still applies on top of it.
    Raises InputError with a one-line message naming the file and the cause.
    """
    if max_pixels <= 0:
        raise ValueError(f"max_pixels must be positive, got {max_pixels}")
    if isinstance(source, np.ndarray):
        return _from_array(source, "image array", max_pixels)
    path = None if isinstance(source, Image.Image) else check_file(source, "image")
    name = "PIL image" if path is None else str(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            if path is None:
                return _from_pil(source, name, max_pixels)
            with Image.open(path, formats=SUPPORTED_FORMATS) as image:
                return _from_pil(image, name, max_pixels)
    except InputError:
        raise
    except Image.DecompressionBombError as exc:
        raise InputError(f"{name}: refusing to decode, decompression-bomb guard ({one_line(exc)})") from None
    except UnidentifiedImageError:
        raise InputError(f"{name}: {_unidentified_reason(path)} (cannot identify image file)") from None
    except Exception as exc:
        raise InputError(f"{name}: cannot decode image ({one_line(exc)})") from None


def _unidentified_reason(path: PathLike) -> str:
    """Tell a damaged image of a supported format apart from a file that is not such an image at all."""
    with open(path, "rb") as handle:
        head = handle.read(16)
    detected = next((fmt for magic, fmt in _SIGNATURES.items() if head.startswith(magic)), None)
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        detected = "WEBP"
    if detected is not None:
        return f"truncated or corrupt {detected} data"
    return "not a supported image format (" + ", ".join(SUPPORTED_FORMATS) + ")"


def _check_size(width: int, height: int, name: str, max_pixels: int) -> None:
    if width <= 0 or height <= 0:
        raise InputError(f"{name}: image has zero size ({width}x{height})")
    if width * height > max_pixels:
        raise InputError(
            f"{name}: image is {width}x{height} = {width * height:,} pixels, above max_pixels={max_pixels:,} "
            "(decompression-bomb guard; raise max_pixels if this image is genuine)"
        )


def _from_pil(image: Image.Image, name: str, max_pixels: int) -> np.ndarray:
    _check_size(*image.size, name, max_pixels)
    image = ImageOps.exif_transpose(image)
    mode = image.mode
    if mode in _SIXTEEN_BIT_MODES or mode == "I":
        values = np.asarray(image).astype(np.int64)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise InputError(f"{name}: 32-bit integer image has values outside the 16-bit range 0..65535")
        return _gray_to_rgb(_scale_16bit(values))
    if mode == "F":
        return _from_array(np.asarray(image), name, max_pixels)
    if mode in _ALPHA_MODES or "transparency" in image.info:
        return _composite_on_white(np.asarray(image.convert("RGBA")))
    return np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8))


def _from_array(array: np.ndarray, name: str, max_pixels: int) -> np.ndarray:
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise InputError(
            f"{name}: expected an image array of shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), "
            f"got {tuple(array.shape)}"
        )
    height, width, channels = array.shape
    _check_size(width, height, name, max_pixels)
    pixels = _to_uint8(array, name)
    if channels == 1:
        return _gray_to_rgb(pixels[:, :, 0])
    if channels == 4:
        return _composite_on_white(pixels)
    return np.ascontiguousarray(pixels)


def _to_uint8(array: np.ndarray, name: str) -> np.ndarray:
    kind = array.dtype.kind
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if array.dtype == np.uint16:
        return _scale_16bit(array.astype(np.int64))
    if kind in "iu":
        low, high = int(array.min()), int(array.max())
        if low < 0 or high > 255:
            raise InputError(
                f"{name}: integer image values must lie in 0..255 (or use uint16 for 16-bit), got range [{low}, {high}]"
            )
        return array.astype(np.uint8)
    if kind == "f":
        if not np.isfinite(array).all():
            raise InputError(f"{name}: image array contains NaN or infinite values")
        low, high = float(array.min()), float(array.max())
        if low < -1e-6 or high > 1 + 1e-6:
            hint = "; divide by 255" if high <= 255 and low >= 0 else ""
            raise InputError(f"{name}: float image values must lie in [0, 1], got range [{low:g}, {high:g}]{hint}")
        return np.rint(np.clip(array, 0.0, 1.0) * 255.0).astype(np.uint8)
    raise InputError(f"{name}: unsupported image array dtype {array.dtype}")


def _scale_16bit(values: np.ndarray) -> np.ndarray:
    """Map 0..65535 onto 0..255 with rounding (65535 / 255 = 257 exactly, so this is x / 257 rounded)."""
    return ((values + 128) // 257).astype(np.uint8)


def _gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2))


def _composite_on_white(rgba: np.ndarray) -> np.ndarray:
    """Blend straight (non-premultiplied) alpha over a white background, exactly, in integer arithmetic."""
    color = rgba[:, :, :3].astype(np.uint32)
    alpha = rgba[:, :, 3:].astype(np.uint32)
    blended = (color * alpha + 255 * (255 - alpha) + 127) // 255
    return np.ascontiguousarray(blended.astype(np.uint8))
