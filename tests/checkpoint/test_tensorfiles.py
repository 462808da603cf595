"""SafetensorsStream: whole tensors in order, or parts of tensors in any order, give a file safetensors reads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmcompose.tensorfiles import SafetensorsStream

TENSORS = {
    "a": torch.arange(12, dtype=torch.float32).view(3, 4),
    "b": torch.arange(5, dtype=torch.int64),
    "c": torch.randn(7, 3).bfloat16(),
}
LAYOUT = {name: (t.dtype, tuple(t.shape)) for name, t in TENSORS.items()}


def test_parts_in_any_order_make_the_same_file(tmp_path: Path) -> None:
    with SafetensorsStream(tmp_path / "whole.safetensors", LAYOUT) as stream:
        for name, tensor in TENSORS.items():
            stream.write(name, tensor)
    with SafetensorsStream(tmp_path / "parts.safetensors", LAYOUT) as stream:
        stream.write_part("c", 10, TENSORS["c"].flatten()[10:])
        stream.write_part("b", 0, TENSORS["b"])
        stream.write_part("a", 4, TENSORS["a"][1:])
        stream.write_part("c", 0, TENSORS["c"].flatten()[:10])
        stream.write_part("a", 0, TENSORS["a"][0])
    assert (tmp_path / "whole.safetensors").read_bytes() == (tmp_path / "parts.safetensors").read_bytes()
    loaded = load_file(tmp_path / "parts.safetensors")
    assert all(torch.equal(loaded[name], tensor) for name, tensor in TENSORS.items())


def test_parts_are_checked(tmp_path: Path) -> None:
    stream = SafetensorsStream(tmp_path / "x.safetensors", LAYOUT)
    with pytest.raises(RuntimeError, match="no entries"):
        stream.write_part("a", 10, torch.zeros(3))  # past the end of a
    with pytest.raises(RuntimeError, match="no entries"):
        stream.write_part("b", 0, torch.zeros(2))  # wrong dtype
    stream.write_part("a", 0, TENSORS["a"])
    stream.write_part("b", 0, TENSORS["b"])
    with pytest.raises(RuntimeError, match="before tensor c"):
        stream.close()
