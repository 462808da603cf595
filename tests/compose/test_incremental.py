"""Adding and removing models from a composed checkpoint equals composing the new set from scratch."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmcompose.checkpoint import read_manifest
from mmcompose.compose.config import ModelEntry, parse_config
from mmcompose.compose.engine import compose
from mmcompose.compose.incremental import recompose
from mmcompose.errors import CompositionError
from tests.compose.test_engine import _train_free_model


@pytest.fixture
def inputs(llama_base: Path, tmp_path: Path) -> dict[str, Path]:
    made = {}
    for seed, modality in enumerate(("image", "audio", "point")):
        for strategy in ("decoupled", "shared"):
            made[f"{modality}-{strategy}"] = _train_free_model(llama_base, tmp_path / "in" / f"{modality}-{strategy}",
                                                               modality, strategy, seed=seed + 20)
    return made


def _same(first: Path, second: Path) -> None:
    one, two = read_manifest(first).model, read_manifest(second).model
    strip = [(d.name, d.kind, d.routes, d.rank, d.alpha) for d in one.deltas]
    assert strip == [(d.name, d.kind, d.routes, d.rank, d.alpha) for d in two.deltas]
    assert one.modalities == two.modalities
    left, right = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    assert left.keys() == right.keys()
    for name in left:
        torch.testing.assert_close(left[name], right[name], rtol=1e-6, atol=1e-7, msg=name)


def _config(paths: list[Path], method: str = "damc", **options) -> dict:
    return parse_config({"method": method, "models": [{"path": str(p)} for p in paths], **options})


@pytest.mark.parametrize(("method", "strategy"), [("damc", "decoupled"), ("naive", "shared"), ("damc", "shared")])
def test_add_and_remove_equal_composing_from_scratch_without_the_inputs(inputs: dict[str, Path], tmp_path: Path,
                                                                        method: str, strategy: str) -> None:
    a, b, c = (inputs[f"{m}-{strategy}"] for m in ("image", "audio", "point"))
    two = compose(_config([a, b], method), tmp_path / "two", progress=False)
    three = compose(_config([a, b, c], method), tmp_path / "three", progress=False)
    shutil.rmtree(a)  # the kept models come from the composed checkpoint, not from their inputs
    added = recompose(two, tmp_path / "added", add=[ModelEntry(path=c)], progress=False)
    _same(added, three)
    removed = recompose(three, tmp_path / "removed", remove=["point"], progress=False)
    _same(removed, two)


def test_explicit_lambdas_are_kept(inputs: dict[str, Path], tmp_path: Path) -> None:
    a, b, c = (inputs[f"{m}-decoupled"] for m in ("image", "audio", "point"))
    two = compose(_config([a, b], lambdas={"image": 0.6, "audio": 0.3}), tmp_path / "two", progress=False)
    added = recompose(two, tmp_path / "added", add=[ModelEntry(path=c, lambda_=0.2)], progress=False)
    expected = compose(parse_config({"method": "damc", "models": [{"path": str(a), "lambda": 0.6},
                                                                  {"path": str(b), "lambda": 0.3},
                                                                  {"path": str(c), "lambda": 0.2}]}),
                       tmp_path / "expected", progress=False)
    _same(added, expected)


def test_nonlinear_merges_need_their_inputs(inputs: dict[str, Path], tmp_path: Path) -> None:
    a, b, c = (inputs[f"{m}-decoupled"] for m in ("image", "audio", "point"))
    options = {"merge": "ties", "parameters": {"density": 0.5}}
    two = compose(_config([a, b], **options), tmp_path / "two", progress=False)
    three = compose(_config([a, b, c], **options), tmp_path / "three", progress=False)
    _same(recompose(two, tmp_path / "added", add=[ModelEntry(path=c)], progress=False), three)
    shutil.rmtree(a)
    with pytest.raises(CompositionError, match="cannot be recomputed without its input 'image'"):
        recompose(two, tmp_path / "again", add=[ModelEntry(path=c)], progress=False)
    assert not (tmp_path / "again").exists()


def test_bad_requests(inputs: dict[str, Path], tmp_path: Path) -> None:
    two = compose(_config([inputs["image-decoupled"], inputs["audio-decoupled"]]), tmp_path / "two", progress=False)
    with pytest.raises(CompositionError, match=r"--remove 'video': .* has no such model"):
        recompose(two, tmp_path / "x", remove=["video"])
    with pytest.raises(CompositionError, match="modality 'image' comes from both"):
        recompose(two, tmp_path / "x", add=[ModelEntry(path=inputs["image-shared"])])
    with pytest.raises(CompositionError, match="not a composed checkpoint"):
        recompose(inputs["image-decoupled"], tmp_path / "x")
    assert not (tmp_path / "x").exists()
