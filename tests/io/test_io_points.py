from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import trimesh
from PIL import Image

from mmcompose.errors import InputError
from mmcompose.io import load_points


def cloud(count: int = 2000, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(count, 3)) * [3.0, 1.0, 0.5] + [10.0, -5.0, 2.0]


def assert_normalised(points: np.ndarray) -> None:
    assert np.abs(points[:, :3].mean(axis=0)).max() < 1e-5
    assert abs(np.linalg.norm(points[:, :3], axis=1).max() - 1.0) < 1e-5


@pytest.mark.parametrize("sampling", ["random", "fps"])
def test_npy_xyz(tmp_path: Path, sampling: str) -> None:
    np.save(tmp_path / "cloud.npy", cloud())
    points = load_points(tmp_path / "cloud.npy", sampling=sampling)
    assert points.shape == (512, 3) and points.dtype == np.float32 and points.flags.c_contiguous
    assert_normalised(points)
    assert len(np.unique(points, axis=0)) == 512  # without replacement
    assert np.array_equal(points, load_points(tmp_path / "cloud.npy", sampling=sampling))  # deterministic
    assert not np.array_equal(points, load_points(tmp_path / "cloud.npy", sampling=sampling, seed=1))


def test_npy_with_color_in_0_255(tmp_path: Path) -> None:
    data = np.concatenate([cloud(), np.tile([255.0, 0.0, 51.0], (2000, 1))], axis=1)
    np.save(tmp_path / "colored.npy", data.astype(np.float32))
    points = load_points(tmp_path / "colored.npy", with_color=True, num_points=100)
    assert points.shape == (100, 6)
    assert np.allclose(points[:, 3:], [1.0, 0.0, 0.2])
    assert load_points(tmp_path / "colored.npy", num_points=100).shape == (100, 3)


def test_unnormalised_points_are_the_input_points() -> None:
    data = cloud(50)
    points = load_points(data, num_points=20, normalize=False)
    assert all((np.abs(data - p).sum(axis=1) < 1e-4).any() for p in points)


def test_fewer_points_than_requested_keeps_every_point() -> None:
    data = cloud(10)
    points = load_points(data, num_points=25, normalize=False)
    assert points.shape == (25, 3)
    assert len(np.unique(points, axis=0)) == 10


def test_farthest_point_sampling_covers_the_extremes() -> None:
    corners = np.array([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)], float)
    interior = np.random.default_rng(0).uniform(-0.5, 0.5, (500, 3))
    points = load_points(np.concatenate([interior, corners]), num_points=9, sampling="fps", normalize=False)
    assert sum(any(np.allclose(p, c) for p in points) for c in corners) == 8


@pytest.mark.parametrize("ext", ["ply", "obj", "off"])
def test_meshes_are_sampled_on_the_surface(tmp_path: Path, ext: str) -> None:
    trimesh.creation.box(extents=(2.0, 1.0, 0.5)).export(tmp_path / f"box.{ext}")
    points = load_points(tmp_path / f"box.{ext}", num_points=300, normalize=False)
    assert points.shape == (300, 3)
    on_face = np.isclose(np.abs(points), [1.0, 0.5, 0.25], atol=1e-5).any(axis=1)
    assert on_face.all() and (np.abs(points) <= np.array([1.0, 0.5, 0.25]) + 1e-5).all()
    # area-weighted: the two 2x1 faces hold 2 / 3.5 of the surface
    assert abs(np.isclose(np.abs(points[:, 2]), 0.25).mean() - 2 / 3.5) < 0.1
    sphere = tmp_path / f"sphere.{ext}"
    trimesh.creation.icosphere(subdivisions=4, radius=2.0).export(sphere)
    radii = np.linalg.norm(load_points(sphere, num_points=200, normalize=False), axis=1)
    assert radii.min() > 1.99 and radii.max() <= 2.0 + 1e-5
    assert_normalised(load_points(sphere, num_points=200))


def test_mesh_fps_sampling_is_deterministic(tmp_path: Path) -> None:
    trimesh.creation.box().export(tmp_path / "box.obj")
    points = load_points(tmp_path / "box.obj", num_points=64, sampling="fps")
    assert points.shape == (64, 3) and np.array_equal(
        points, load_points(tmp_path / "box.obj", num_points=64, sampling="fps")
    )


def test_colored_mesh_and_point_cloud_ply(tmp_path: Path) -> None:
    box = trimesh.creation.box()
    box.visual.vertex_colors = np.tile([255, 0, 0, 255], (len(box.vertices), 1))
    box.export(tmp_path / "red_box.ply")
    points = load_points(tmp_path / "red_box.ply", num_points=50, with_color=True)
    assert points.shape == (50, 6) and np.allclose(points[:, 3:], [1, 0, 0])
    faces = trimesh.creation.box()
    faces.visual.face_colors = np.tile([0, 255, 0, 255], (len(faces.faces), 1))
    faces.export(tmp_path / "green_box.ply")
    assert np.allclose(load_points(tmp_path / "green_box.ply", num_points=10, with_color=True)[:, 3:], [0, 1, 0])
    colors = np.tile([0, 0, 255, 255], (300, 1)).astype(np.uint8)
    trimesh.PointCloud(cloud(300), colors=colors).export(tmp_path / "blue_cloud.ply")
    points = load_points(tmp_path / "blue_cloud.ply", num_points=64, with_color=True)
    assert points.shape == (64, 6) and np.allclose(points[:, 3:], [0, 0, 1])
    assert_normalised(points)


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (np.zeros((10, 4)), "got (10, 4)"),
        (np.zeros(30), "got (30,)"),
        (np.zeros((2, 10, 3)), "got (2, 10, 3)"),
        (np.zeros((0, 3)), "point cloud is empty"),
        (np.array([[0.0, 0.0, np.nan]] * 4), "NaN or infinite"),
        (np.array([[0.0, np.inf, 0.0]] * 4), "NaN or infinite"),
        (np.ones((5, 3)), "all points coincide"),
        (np.zeros((5, 3), bool), "dtype bool"),
    ],
)
def test_bad_arrays(array: np.ndarray, message: str) -> None:
    with pytest.raises(InputError, match=r"^point array: ") as info:
        load_points(array)
    assert message in str(info.value)


def test_huge_coordinates_normalise_or_are_refused() -> None:
    huge = np.full((5, 3), 1e300) * np.arange(5)[:, None]
    assert_normalised(load_points(huge, num_points=5))
    with pytest.raises(InputError, match="too large"):
        load_points(huge, num_points=5, normalize=False)
    with pytest.raises(InputError, match="too large"):
        load_points(np.array([[1.5e308, 0, 0], [1.7e308, 0, 0], [-1e308, 1, 0]]), num_points=3)


def test_bad_colors() -> None:
    with pytest.raises(InputError, match=r"with_color=True needs \(N, 6\)"):
        load_points(cloud(10), with_color=True)
    bad = np.concatenate([cloud(10), np.full((10, 3), -1.0)], axis=1)
    with pytest.raises(InputError, match="colours must lie in"):
        load_points(bad, with_color=True)


def test_bad_files(tmp_path: Path) -> None:
    (tmp_path / "empty.ply").write_bytes(b"")
    Image.new("RGB", (8, 8)).save(tmp_path / "picture.ply", format="PNG")
    (tmp_path / "noise.obj").write_bytes(np.random.default_rng(3).integers(0, 256, 600, np.uint8).tobytes())
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object))
    np.save(tmp_path / "nan.npy", np.array([[0.0, np.nan, 1.0]] * 3))
    np.savez(tmp_path / "archive.npy", points=cloud(10))
    (tmp_path / "archive.npy.npz").rename(tmp_path / "archive.npy")
    (tmp_path / "cloud.xyz").write_text("0 0 0\n")
    (tmp_path / "bad_index.obj").write_text("v 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 9\n")
    header = "ply\nformat ascii 1.0\nelement vertex 3\nproperty float x\nproperty float y\nproperty float z\n"
    header += "element face 1\nproperty list uchar int vertex_indices\nend_header\n"
    (tmp_path / "bad_index.ply").write_text(header + "0 0 0\n1 0 0\n0 1 0\n3 0 1 9\n")
    (tmp_path / "flat.obj").write_text("v 0 0 0\nv 1 0 0\nv 2 0 0\nf 1 2 3\n")
    (tmp_path / "plain.obj").write_text("v 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 3\n")
    with open(tmp_path / "huge.npy", "wb") as handle:  # header claims 10^12 points, body has none
        np.lib.format.write_array_header_1_0(handle, {"descr": "<f4", "fortran_order": False, "shape": (10**12, 3)})
    cases = {
        tmp_path / "empty.ply": "empty file",
        tmp_path / "missing.npy": "no such file",
        tmp_path: "is a directory",
        tmp_path / "picture.ply": "cannot read PLY file",
        tmp_path / "noise.obj": "file contains no vertices",
        tmp_path / "objects.npy": "not a readable .npy array",
        tmp_path / "nan.npy": "NaN or infinite",
        tmp_path / "archive.npy": "got an .npz archive",
        tmp_path / "cloud.xyz": "unsupported point-cloud file type '.xyz'",
        tmp_path / "bad_index.obj": "cannot read OBJ file (IndexError",
        tmp_path / "bad_index.ply": "faces reference vertices that do not exist",
        tmp_path / "flat.obj": "mesh has no surface area",
        tmp_path / "huge.npy": "not a readable .npy array",
    }
    for path, message in cases.items():
        with pytest.raises(InputError) as info:
            load_points(path)
        assert str(info.value).startswith(f"{path}: ") and message in str(info.value), str(info.value)
    with pytest.raises(InputError, match="no vertex or face colours"):
        load_points(tmp_path / "plain.obj", with_color=True)


def test_truncated_ascii_ply(tmp_path: Path) -> None:
    header = "ply\nformat ascii 1.0\nelement vertex 5\nproperty float x\nproperty float y\nproperty float z\n"
    (tmp_path / "cut.ply").write_text(header + "end_header\n0 0 0\n1 0 0\n0 1 0\n")
    with pytest.raises(InputError, match=r"cut\.ply: truncated PLY \(header declares 5 vertex elements, file holds 3"):
        load_points(tmp_path / "cut.ply")
    faces = header.replace("5", "3") + "element face 2\nproperty list uchar int vertex_indices\nend_header\n"
    (tmp_path / "faces.ply").write_text(faces + "0 0 0\n1 0 0\n0 1 0\n3 0 1 2\n")
    with pytest.raises(InputError, match=r"declares 2 face elements, file holds 1"):
        load_points(tmp_path / "faces.ply")
