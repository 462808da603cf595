"""Checkpoint round trip and every way a checkpoint can be wrong."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mmcompose.checkpoint import fingerprint_base, load_checkpoint, save_checkpoint
from mmcompose.errors import CheckpointError, MMComposeError
from mmcompose.model import Example, MultimodalLLM
from tests.conftest import make_base
from tests.model.helpers import random_input, randomize_deltas, tiny_modality


@pytest.fixture
def saved(llama_base: Path, tmp_path: Path) -> tuple[MultimodalLLM, Path]:
    model = MultimodalLLM.from_base(llama_base, [tiny_modality("image", boundary=1), tiny_modality("audio")],
                                    strategy="decoupled", rank=4, alpha=8.0)
    randomize_deltas(model, seed=2, scale=0.2)
    return model, save_checkpoint(model, tmp_path / "ckpt")


def _logits(model: MultimodalLLM) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    example = Example(prompt="USER: <image> <audio> ok?", inputs={"image": [random_input("image", generator)],
                                                                   "audio": [random_input("audio", generator)]})
    with torch.no_grad():
        return model.eval()(model.assemble([example])).logits


def test_round_trip_is_exact(saved: tuple[MultimodalLLM, Path]) -> None:
    model, path = saved
    loaded = load_checkpoint(path)
    original, reloaded = model.checkpoint_tensors(), loaded.checkpoint_tensors()
    assert original.keys() == reloaded.keys()
    for name in original:
        assert torch.equal(original[name], reloaded[name]), name
    assert torch.equal(_logits(model), _logits(loaded))
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["format_version"] == 1 and manifest["base"]["fingerprint"].startswith("sha256:")
    assert not Path(manifest["base"]["path"]).is_absolute()
    assert [d["name"] for d in manifest["model"]["deltas"]] == ["language", "image", "audio"]


def _rewrite_tensors(path: Path, change) -> None:
    tensors = load_file(path / "model.safetensors")
    change(tensors)
    save_file(tensors, path / "model.safetensors")


def test_missing_tensor(saved: tuple[MultimodalLLM, Path]) -> None:
    _, path = saved
    _rewrite_tensors(path, lambda t: t.pop(sorted(t)[0]))
    with pytest.raises(CheckpointError, match="1 missing tensor"):
        load_checkpoint(path)


def test_unexpected_tensor(saved: tuple[MultimodalLLM, Path]) -> None:
    _, path = saved
    _rewrite_tensors(path, lambda t: t.update({"deltas.extra.weight": torch.zeros(1)}))
    with pytest.raises(CheckpointError, match=r"1 unexpected tensor.*deltas\.extra\.weight"):
        load_checkpoint(path)


def test_shape_and_dtype_mismatch(saved: tuple[MultimodalLLM, Path]) -> None:
    _, path = saved
    name = "modalities.image.prefix"
    _rewrite_tensors(path, lambda t: t.update({name: torch.zeros(3, 3)}))
    with pytest.raises(CheckpointError, match=f"model.safetensors: tensor {name} has shape \\(3, 3\\), but the "
                                              f"manifest's model.modalities\\[0\\] \\(image\\).num_prefix_tokens 1 "
                                              f"makes it \\(1, 32\\)"):
        load_checkpoint(path)
    _rewrite_tensors(path, lambda t: t.update({name: torch.zeros(1, 32, dtype=torch.int32)}))
    with pytest.raises(CheckpointError, match=f"tensor {name} has dtype torch.int32, expected torch.float32"):
        load_checkpoint(path)


def test_unknown_format_version_and_bad_manifest(saved: tuple[MultimodalLLM, Path]) -> None:
    _, path = saved
    manifest = json.loads((path / "manifest.json").read_text())
    (path / "manifest.json").write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(CheckpointError, match="unknown format_version 99"):
        load_checkpoint(path)
    (path / "manifest.json").write_text(json.dumps({**manifest, "colour": "red"}))
    with pytest.raises(CheckpointError, match="colour: Extra inputs are not permitted"):
        load_checkpoint(path)
    (path / "manifest.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="invalid JSON"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="not an mmcompose checkpoint"):
        load_checkpoint(path.parent)


def test_different_base_is_refused(saved: tuple[MultimodalLLM, Path], tmp_path: Path) -> None:
    _, path = saved
    other = make_base(tmp_path / "other", seed=1)
    assert fingerprint_base(other) != json.loads((path / "manifest.json").read_text())["base"]["fingerprint"]
    with pytest.raises(CheckpointError, match="is not the one this checkpoint was built on"):
        load_checkpoint(path, base=other)
    with pytest.raises(CheckpointError, match="base LLM not found"):
        load_checkpoint(path, base=tmp_path / "nowhere")


def test_existing_output_and_interrupted_save_leave_nothing_behind(saved: tuple[MultimodalLLM, Path],
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    model, path = saved
    with pytest.raises(MMComposeError, match="already exists"):
        save_checkpoint(model, path)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("mmcompose.tensorfiles.SafetensorsStream.write", interrupted)
    target = path.parent / "second"
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(model, target)
    assert sorted(p.name for p in path.parent.iterdir()) == ["ckpt"]
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(model, path, overwrite=True)
    assert (path / "manifest.json").is_file() and sorted(p.name for p in path.parent.iterdir()) == ["ckpt"]


def test_moved_world_directory_still_finds_its_base(llama_base: Path, tmp_path: Path) -> None:
    world = tmp_path / "world"
    shutil.copytree(llama_base, world / "base")
    model = MultimodalLLM.from_base(world / "base", [tiny_modality("point")], strategy="shared")
    save_checkpoint(model, world / "models" / "point")
    moved = tmp_path / "moved"
    shutil.move(world, moved)
    assert load_checkpoint(moved / "models" / "point").spec == model.spec


def test_load_in_bfloat16(saved: tuple[MultimodalLLM, Path]) -> None:
    model, path = saved
    half = load_checkpoint(path, dtype=torch.bfloat16)
    assert {t.dtype for t in half.checkpoint_tensors().values()} == {torch.bfloat16}
    logits = _logits(half)
    assert logits.dtype == torch.bfloat16
    torch.testing.assert_close(logits.float(), _logits(model), atol=0.1, rtol=0.05)


def test_save_pretrained_and_from_pretrained_are_the_checkpoint_functions(saved: tuple[MultimodalLLM, Path],
                                                                          tmp_path: Path) -> None:
    model, path = saved
    again = model.save_pretrained(tmp_path / "again")
    assert (again / "manifest.json").read_text() == (path / "manifest.json").read_text()
    assert load_file(again / "model.safetensors").keys() == load_file(path / "model.safetensors").keys()
    loaded = MultimodalLLM.from_pretrained(again)
    assert torch.equal(_logits(loaded), _logits(model))
    assert save_checkpoint is MultimodalLLM.save_pretrained
    assert load_checkpoint == MultimodalLLM.from_pretrained
