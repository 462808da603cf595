"""Load point clouds and meshes into fixed-size, normalised float32 point arrays."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Literal

import numpy as np

from mmcompose.errors import InputError
from mmcompose.io._common import PathLike, check_file, one_line

#: File types we read; .npy with numpy, the mesh/cloud formats with trimesh.
SUPPORTED_SUFFIXES = (".npy", ".ply", ".obj", ".off")

Sampling = Literal["random", "fps"]


def load_points(
    source: PathLike | np.ndarray,
    *,
    num_points: int = 512,
    with_color: bool = False,
    normalize: bool = True,
    seed: int = 0,
    sampling: Sampling = "random",
) -> np.ndarray:
    """Load a point cloud as a float32 array of shape (num_points, 3), or (num_points, 6) with `with_color`.

    Columns are x, y, z and, with colour, r, g, b in [0, 1]. `source` is an (N, 3) / (N, 6) array or file:
    .npy (same layout), .ply (point cloud or mesh), .obj or .off (meshes). Meshes are sampled uniformly on
    their surface (area-weighted, colours interpolated from vertex colours or taken from face colours);
    point clouds are subsampled. Colours stored as 0..255 (any value above 1) are divided by 255.

    The point count is fixed deterministically from `seed`: "random" draws without replacement when there are
    enough points; "fps" (farthest-point sampling, from a seeded start) covers the shape more evenly at
    O(N * num_points) cost. With fewer than `num_points` points every point is kept once and the rest are
    drawn with replacement. With `normalize`, the sampled points are centred on their mean and scaled to fit
    the unit sphere (max norm 1), as Point-BERT-style encoders expect; a cloud whose points all coincide is
    refused then. NaN/Inf coordinates, wrong shapes and colourless input with `with_color` are refused.
    Raises InputError with a one-line message naming the file and the cause.
    """
    if num_points < 1:
        raise ValueError(f"num_points must be at least 1, got {num_points}")
    if sampling not in ("random", "fps"):
        raise ValueError(f"unknown sampling {sampling!r}; use 'random' or 'fps'")
    rng = np.random.default_rng(seed)
    if isinstance(source, np.ndarray):
        name = "point array"
        xyz, rgb = _split_columns(source, name, with_color)
        xyz, rgb = _subsample(xyz, rgb, num_points, sampling, rng)
    else:
        path = check_file(source, "point-cloud")
        name = str(path)
        suffix = path.suffix.lower()
        if suffix not in SUPPORTED_SUFFIXES:
            raise InputError(
                f"{name}: unsupported point-cloud file type '{suffix}' (supported: {', '.join(SUPPORTED_SUFFIXES)})"
            )
        if suffix == ".npy":
            xyz, rgb = _split_columns(_read_npy(path, name), name, with_color)
            xyz, rgb = _subsample(xyz, rgb, num_points, sampling, rng)
        else:
            xyz, rgb = _from_trimesh(path, name, suffix, num_points, with_color, sampling, rng)
    if normalize:
        with np.errstate(over="ignore", invalid="ignore"):  # overflow is detected below, not warned about
            xyz = xyz - xyz.mean(axis=0)
            radius = float(np.hypot(np.hypot(xyz[:, 0], xyz[:, 1]), xyz[:, 2]).max())
        if radius == 0:
            raise InputError(f"{name}: all points coincide, cannot normalise to the unit sphere")
        if not np.isfinite(radius):
            raise InputError(f"{name}: coordinates are too large to normalise (overflow)")
        xyz = xyz / radius
    if not (np.isfinite(xyz).all() and np.abs(xyz).max() <= np.finfo(np.float32).max):
        raise InputError(f"{name}: coordinates are too large (overflow beyond float32 range)")
    out = xyz if rgb is None else np.concatenate([xyz, rgb], axis=1)
    return np.ascontiguousarray(out, dtype=np.float32)


def _read_npy(path: Path, name: str) -> np.ndarray:
    # Memory-mapped so that a header claiming a huge shape fails on the file size instead of allocating.
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as exc:
        raise InputError(f"{name}: not a readable .npy array ({one_line(exc)})") from None
    if not isinstance(array, np.ndarray):
        raise InputError(f"{name}: expected a single .npy array, got an .npz archive")
    return array


def _split_columns(array: np.ndarray, name: str, with_color: bool) -> tuple[np.ndarray, np.ndarray | None]:
    if array.ndim != 2 or array.shape[1] not in (3, 6):
        raise InputError(f"{name}: expected points of shape (N, 3) or (N, 6), got {tuple(array.shape)}")
    if array.dtype.kind not in "iuf":
        raise InputError(f"{name}: unsupported point dtype {array.dtype}")
    if array.shape[0] == 0:
        raise InputError(f"{name}: point cloud is empty")
    values = np.array(array, dtype=np.float64)  # a copy: never keep a memory map of the user's file open
    if not np.isfinite(values).all():
        raise InputError(f"{name}: points contain NaN or infinite values")
    if not with_color:
        return values[:, :3], None
    if values.shape[1] != 6:
        raise InputError(f"{name}: with_color=True needs (N, 6) points with r, g, b columns, got (N, 3)")
    return values[:, :3], _unit_colors(values[:, 3:], name)


def _unit_colors(colors: np.ndarray, name: str) -> np.ndarray:
    colors = colors.astype(np.float64)
    low, high = float(colors.min()), float(colors.max())
    if low < 0 or high > 255:
        raise InputError(f"{name}: colours must lie in [0, 1] or 0..255, got range [{low:g}, {high:g}]")
    return colors / 255.0 if high > 1 else colors


def _subsample(
    xyz: np.ndarray, rgb: np.ndarray | None, count: int, sampling: Sampling, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray | None]:
    total = xyz.shape[0]
    if total < count:
        index = np.concatenate([rng.permutation(total), rng.integers(0, total, count - total)])
    elif sampling == "fps":
        index = _farthest_points(xyz, count, rng)
    else:
        index = rng.choice(total, count, replace=False)
    return xyz[index], None if rgb is None else rgb[index]


def _farthest_points(xyz: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """Greedy farthest-point sampling: each new point is the one farthest from all points chosen so far."""
    chosen = np.empty(count, dtype=np.int64)
    chosen[0] = rng.integers(xyz.shape[0])
    distance = np.full(xyz.shape[0], np.inf)
    for i in range(1, count):
        distance = np.minimum(distance, ((xyz - xyz[chosen[i - 1]]) ** 2).sum(axis=1))
        chosen[i] = int(distance.argmax())
    return chosen


def _from_trimesh(
    path: Path, name: str, suffix: str, count: int, with_color: bool, sampling: Sampling, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray | None]:
    import trimesh  # deferred: only mesh files need it, and it is slow to import

    try:
        if suffix == ".ply":
            loaded = trimesh.load(str(path), file_type="ply", process=False, validate=False)
        else:
            # OBJ/OFF are text. Decoding here keeps trimesh from guessing the charset of binary junk with an
            # optional package (charset_normalizer); the resolver still finds an OBJ's materials and textures.
            text = io.StringIO(path.read_bytes().decode("utf-8", errors="replace"))
            resolver = trimesh.resolvers.FilePathResolver(str(path))
            loaded = trimesh.load(text, file_type=suffix[1:], resolver=resolver, process=False, validate=False)
        if isinstance(loaded, trimesh.Scene):
            loaded = loaded.to_geometry()
        vertices = np.asarray(loaded.vertices, dtype=np.float64)
        faces = np.asarray(getattr(loaded, "faces", np.zeros((0, 3))), dtype=np.int64)
        colors = _trimesh_colors(loaded, with_color)
    except Exception as exc:
        raise InputError(f"{name}: cannot read {suffix[1:].upper()} file ({one_line(exc)})") from None
    if vertices.ndim != 2 or vertices.shape[1] != 3 or vertices.shape[0] == 0:
        raise InputError(f"{name}: file contains no vertices")
    if suffix == ".ply":
        _check_ply_complete(path, name, len(vertices), len(faces))
    if not np.isfinite(vertices).all():
        raise InputError(f"{name}: vertices contain NaN or infinite values")
    if faces.size and (faces.ndim != 2 or faces.shape[1] != 3 or faces.min() < 0 or faces.max() >= len(vertices)):
        raise InputError(f"{name}: faces reference vertices that do not exist")
    if with_color:
        owners = len(faces) if colors is not None and colors[1] == "face" else len(vertices)
        if colors is None or (colors[1] == "face" and faces.size == 0):
            raise InputError(f"{name}: file has no vertex or face colours, but with_color=True was requested")
        if colors[0].shape != (owners, 3) or not np.isfinite(colors[0]).all():
            raise InputError(f"{name}: colour table does not match the {colors[1]} count")
    if faces.size == 0:
        return _subsample(vertices, None if colors is None else colors[0], count, sampling, rng)
    # Farthest-point sampling picks from a 4x denser surface sample, so it can still choose where points go.
    drawn = count if sampling == "random" else 4 * count
    xyz, rgb = _sample_surface(vertices, faces, colors, drawn, name, rng)
    return _subsample(xyz, rgb, count, sampling, rng) if drawn > count else (xyz, rgb)


def _check_ply_complete(path: Path, name: str, vertices: int, faces: int) -> None:
    """Refuse a PLY holding fewer elements than its header declares: trimesh accepts truncated ASCII bodies."""
    declared = {}
    with open(path, "rb") as handle:
        for _ in range(1000):  # a header is a few dozen lines; stop at junk rather than read a whole file
            words = handle.readline(1000).split()
            if not words or words == [b"end_header"]:
                break
            if len(words) == 3 and words[0] == b"element" and words[2].isdigit():
                declared[words[1]] = int(words[2])
    # Polygons are split into triangles on loading, so a complete file has at least as many faces as declared.
    for kind, found in ((b"vertex", vertices), (b"face", faces)):
        if found < declared.get(kind, 0):
            raise InputError(
                f"{name}: truncated PLY (header declares {declared[kind]} {kind.decode()} elements, file holds {found})"
            )


def _trimesh_colors(loaded: object, with_color: bool) -> tuple[np.ndarray, str] | None:
    """(colours in [0, 1], "vertex" or "face"), or None when the file stores no colour at all."""
    if not with_color:
        return None
    colors = getattr(loaded, "colors", None)  # PointCloud
    if colors is not None and len(colors):
        return np.asarray(colors, dtype=np.float64)[:, :3] / 255.0, "vertex"
    visual = getattr(loaded, "visual", None)
    kind = getattr(visual, "kind", None)
    if kind == "texture":
        visual, kind = visual.to_color(), "vertex"
    if kind == "vertex":
        return np.asarray(visual.vertex_colors, dtype=np.float64)[:, :3] / 255.0, "vertex"
    if kind == "face":
        return np.asarray(visual.face_colors, dtype=np.float64)[:, :3] / 255.0, "face"
    return None


def _sample_surface(
    vertices: np.ndarray,
    faces: np.ndarray,
    colors: tuple[np.ndarray, str] | None,
    count: int,
    name: str,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Uniform samples on the surface: faces drawn by area, points by uniform barycentric coordinates."""
    corner_a, corner_b, corner_c = (vertices[faces[:, k]] for k in range(3))
    with np.errstate(over="ignore", invalid="ignore"):  # huge coordinates are refused just below
        areas = 0.5 * np.linalg.norm(np.cross(corner_b - corner_a, corner_c - corner_a), axis=1)
        total = areas.sum()
    if not np.isfinite(total):
        raise InputError(f"{name}: mesh coordinates are too large (surface area overflows)")
    if total <= 0:
        raise InputError(f"{name}: mesh has no surface area to sample (all faces are degenerate)")
    face = rng.choice(faces.shape[0], count, p=areas / total)
    root, second = np.sqrt(rng.random(count)), rng.random(count)
    weights = np.stack([1.0 - root, root * (1.0 - second), root * second], axis=1)
    xyz = np.einsum("nk,nkd->nd", weights, vertices[faces[face]])
    if colors is None:
        return xyz, None
    values, kind = colors
    rgb = values[face] if kind == "face" else np.einsum("nk,nkd->nd", weights, values[faces[face]])
    return xyz, rgb
