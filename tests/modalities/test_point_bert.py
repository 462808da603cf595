"""Point-BERT: a state dict written with the documented PointLLM / ModelCompose names and shapes loads (bare,
wrapped, prefixed, pickled or safetensors), wrong ones are refused in one line, and the encoder behaves as a
set function of the points."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mmcompose.errors import CheckpointError
from mmcompose.modalities.point_bert import PointBERTEncoder
from tests.modalities.tiny import POINT_BERT, assert_equivalent, rebuilt


def documented_state_dict(trans_dim: int, depth: int, encoder_dims: int, point_dims: int,
                          seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors under the names and shapes of Point-BERT's `PointTransformer` (PointLLM's
    pointllm/model/pointbert/point_encoder.py and dvae.py), written from the facts, not from our module."""
    width, hidden = trans_dim, 4 * trans_dim
    shapes: dict[str, tuple[int, ...]] = {
        "cls_token": (1, 1, width), "cls_pos": (1, 1, width),
        "encoder.first_conv.0.weight": (128, point_dims, 1), "encoder.first_conv.0.bias": (128,),
        "encoder.first_conv.3.weight": (256, 128, 1), "encoder.first_conv.3.bias": (256,),
        "encoder.second_conv.0.weight": (512, 512, 1), "encoder.second_conv.0.bias": (512,),
        "encoder.second_conv.3.weight": (encoder_dims, 512, 1), "encoder.second_conv.3.bias": (encoder_dims,),
        "reduce_dim.weight": (width, encoder_dims), "reduce_dim.bias": (width,),
        "pos_embed.0.weight": (128, 3), "pos_embed.0.bias": (128,),
        "pos_embed.2.weight": (width, 128), "pos_embed.2.bias": (width,),
        "norm.weight": (width,), "norm.bias": (width,),
    }
    for conv, channels in (("first_conv", 128), ("second_conv", 512)):
        for stat in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"encoder.{conv}.1.{stat}"] = (channels,)
    for i in range(depth):
        block = f"blocks.blocks.{i}"
        shapes |= {f"{block}.norm1.weight": (width,), f"{block}.norm1.bias": (width,),
                   f"{block}.attn.qkv.weight": (3 * width, width),
                   f"{block}.attn.proj.weight": (width, width), f"{block}.attn.proj.bias": (width,),
                   f"{block}.norm2.weight": (width,), f"{block}.norm2.bias": (width,),
                   f"{block}.mlp.fc1.weight": (hidden, width), f"{block}.mlp.fc1.bias": (hidden,),
                   f"{block}.mlp.fc2.weight": (width, hidden), f"{block}.mlp.fc2.bias": (width,)}
    generator = torch.Generator().manual_seed(seed)
    tensors = {name: torch.randn(shape, generator=generator) * 0.1 for name, shape in shapes.items()}
    for name in tensors:
        if name.endswith("running_var"):
            tensors[name] = tensors[name].abs() + 0.5
    tensors["encoder.first_conv.1.num_batches_tracked"] = torch.tensor(7)
    tensors["encoder.second_conv.1.num_batches_tracked"] = torch.tensor(7)
    return tensors


def _points(n: int = 2, count: int = 64, channels: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, count, channels, generator=torch.Generator().manual_seed(seed))


def test_module_names_and_shapes_are_the_documented_ones() -> None:
    for options in (POINT_BERT, {}):  # tiny, and the PointLLM v1.2 defaults with colour
        options = {**options, "point_dims": 6}
        encoder = PointBERTEncoder(**options)
        defaults = dict(trans_dim=384, depth=12, encoder_dims=256) | {k: v for k, v in options.items()
                                                                        if k in ("trans_dim", "depth", "encoder_dims")}
        expected = documented_state_dict(**defaults, point_dims=6)
        assert {k: tuple(v.shape) for k, v in encoder.state_dict().items()} == \
            {k: tuple(v.shape) for k, v in expected.items()}


def test_pointllm_sizes_give_513_tokens_of_384() -> None:
    encoder = PointBERTEncoder(depth=1, point_dims=6).eval()
    with torch.no_grad():
        assert encoder(_points(1, 1024, 6)).shape == (1, 513, 384)


@pytest.mark.parametrize("layout", ["bare.pt", "pointllm.bin", "prefixed.safetensors"])
def test_loads_a_documented_state_dict(tmp_path: Path, layout: str) -> None:
    tensors = documented_state_dict(POINT_BERT["trans_dim"], POINT_BERT["depth"], POINT_BERT["encoder_dims"], 3)
    path = tmp_path / layout
    if layout == "bare.pt":  # ModelCompose's point_bert_v1.2.pt
        torch.save(tensors, path)
    elif layout == "pointllm.bin":  # a Point-BERT training checkpoint, as PointLLM's loader reads it
        extra = {"module.cls_head_finetune.0.weight": torch.zeros(2, 2)}
        torch.save({"state_dict": {**{f"module.point_encoder.{k}": v for k, v in tensors.items()}, **extra}}, path)
    else:
        save_file({f"model.point_backbone.{k}": v for k, v in tensors.items()}, path)
    encoder = PointBERTEncoder.from_state_dict_file(path, **POINT_BERT).eval()
    loaded = encoder.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())
    with torch.no_grad():
        tokens = encoder(_points())
    assert tokens.shape == (2, POINT_BERT["num_group"] + 1, POINT_BERT["trans_dim"])
    assert torch.isfinite(tokens).all()
    assert_equivalent(encoder, rebuilt(encoder), _points())


def test_refuses_a_wrong_key_set_in_one_line(tmp_path: Path) -> None:
    tensors = documented_state_dict(POINT_BERT["trans_dim"], POINT_BERT["depth"], POINT_BERT["encoder_dims"], 3)
    cases = {
        "missing": ({k: v for k, v in tensors.items() if not k.startswith("blocks.blocks.1.")},
                    r"do not match the Point-BERT config \(missing key blocks\.blocks\.1\..*; \d+ missing, 0 "),
        "unexpected": ({**tensors, "head.weight": torch.zeros(1)},
                       r"\(unexpected key head\.weight; 0 missing, 1 unexpected\)"),
        "shape": ({**tensors, "reduce_dim.weight": torch.zeros(32, 99)},
                  r"key reduce_dim\.weight has shape \(32, 99\), the config implies \(32, 24\)"),
        "no-cls": ({k: v for k, v in tensors.items() if k != "cls_token"}, "no Point-BERT weights found"),
    }
    for name, (state, message) in cases.items():
        torch.save(state, tmp_path / f"{name}.pt")
        with pytest.raises(CheckpointError, match=message) as error:
            PointBERTEncoder.from_state_dict_file(tmp_path / f"{name}.pt", **POINT_BERT)
        assert "\n" not in str(error.value)
    with pytest.raises(CheckpointError, match="missing key cls_token"):  # an explicit prefix skips detection
        PointBERTEncoder.from_state_dict_file(tmp_path / "no-cls.pt", prefix="", **{**POINT_BERT, "depth": 2})
    with pytest.raises(CheckpointError, match="no such file"):
        PointBERTEncoder.from_state_dict_file(tmp_path / "absent.pt")


class _Payload:
    """Unpickling this would run code; `weights_only=True` must refuse it instead."""

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (print, ("pickled code ran",))


def test_never_executes_pickled_code(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps({"cls_token": _Payload()}, protocol=2))
    with pytest.raises(CheckpointError, match="refused: the pickle holds objects other than tensors"):
        PointBERTEncoder.from_state_dict_file(path, **POINT_BERT)
    assert "pickled code ran" not in capsys.readouterr().out
    torch.save({"cls_token": "not a tensor"}, tmp_path / "strings.pt")
    with pytest.raises(CheckpointError, match="entry 'cls_token' is a str, not a tensor"):
        PointBERTEncoder.from_state_dict_file(tmp_path / "strings.pt", **POINT_BERT)


def test_point_order_colour_and_cls() -> None:
    torch.manual_seed(0)
    encoder = PointBERTEncoder(**POINT_BERT, point_dims=6).eval()
    points = _points(2, 64, 6)
    shuffled = torch.cat([points[:, :1], points[:, 1:][:, torch.randperm(63)]], dim=1)  # FPS starts at point 0
    recoloured = points.clone()
    recoloured[..., 3:] += 1.0
    without_cls = PointBERTEncoder(**{**encoder.options, "drop_cls": True}).eval()
    without_cls.load_state_dict(encoder.state_dict())
    with torch.no_grad():
        tokens = encoder(points)
        torch.testing.assert_close(encoder(shuffled), tokens)
        assert not torch.allclose(encoder(recoloured), tokens)  # colour is a feature, not ignored
        torch.testing.assert_close(without_cls(points), tokens[:, 1:])
    for wrong in (_points(1, 64, 3), _points(1, 12, 6)):  # xyz only; fewer points than groups
        with pytest.raises(ValueError, match=r"expected \(n, N >= 16, 6\) points"):
            encoder(wrong)
