"""The official recipe's details that change what trains: LoRA dropout, boundary tokens that start at zero, and
images padded to a square before resizing (`image_aspect_ratio: pad`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mmcompose.modalities.processors import IMAGENET_MEAN, IMAGENET_STD, ImageProcessor
from mmcompose.model.routed import LoRADelta
from mmcompose.train.recipe import load_recipe
from mmcompose.train.trainer import build_model, train
from tests.train.conftest import samples, saved_tensors, tiny_spec
from tests.train.test_trainer import config

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def test_lora_dropout_drops_delta_inputs_in_training_only() -> None:
    torch.manual_seed(0)
    delta = LoRADelta(64, 8, rank=4, alpha=8)
    torch.nn.init.normal_(delta.lora_B)
    x = torch.randn(16, 64)
    expected = x @ delta.lora_A.T @ delta.lora_B.T * delta.scaling
    torch.testing.assert_close(delta.train()(x), expected)  # dropout 0: nothing dropped
    delta.dropout = 0.5
    first, second = delta(x), delta(x)
    assert not torch.allclose(first, expected) and not torch.allclose(first, second)
    torch.manual_seed(1)
    kept = torch.nn.functional.dropout(torch.ones_like(x), 0.5, training=True)  # the mask the delta draws next
    torch.manual_seed(1)
    torch.testing.assert_close(delta(x), (x * kept) @ delta.lora_A.T @ delta.lora_B.T * delta.scaling)
    torch.testing.assert_close(delta.eval()(x), expected)


def test_the_trainer_applies_lora_dropout(llama_base: Path, world: Path, tmp_path: Path) -> None:
    data = samples(world, "image_instruct", 8)
    runs = {}
    for rate in (0.0, 0.3):
        model = build_model(llama_base, [tiny_spec("image")], strategy="decoupled", rank=2, seed=0)
        train(model, data, world, config(steps=2, lora_dropout=rate), tmp_path / str(rate), progress=False)
        assert {d.dropout for d in model.modules() if isinstance(d, LoRADelta)} == {rate}
        runs[rate] = saved_tensors(tmp_path / str(rate))
    deltas = [key for key in runs[0.0] if key.startswith("deltas.")]
    assert any(not torch.equal(runs[0.0][key], runs[0.3][key]) for key in deltas)


def test_fresh_boundary_tokens_start_at_zero(llama_base: Path, world: Path, tmp_path: Path) -> None:
    stage1 = build_model(llama_base, [tiny_spec("image", boundary=0)], strategy="connector-only", seed=0)
    train(stage1, samples(world, "image_caption", 4), world, config(stage="pretrain", steps=1), tmp_path / "s1",
          progress=False)
    stage2 = build_model(llama_base, ["image"], strategy="decoupled", rank=2, boundary_tokens=5,
                         start_from=[tmp_path / "s1" / "model"])
    branch = stage2.branches["image"]
    assert branch.prefix.shape == branch.suffix.shape == (5, stage2.llm.config.hidden_size)
    assert not branch.prefix.any() and not branch.suffix.any()
    fresh = build_model(llama_base, [tiny_spec("image", boundary=3)], strategy="decoupled", rank=2, seed=7)
    assert not fresh.branches["image"].prefix.any()


def test_pad_to_square_pads_with_the_mean_colour_before_resizing() -> None:
    wide = np.zeros((8, 24, 3), dtype=np.uint8)
    wide[..., 0] = 255  # a red strip, three times as wide as high
    padded = ImageProcessor(size=24, pad_to_square=True)(wide)
    assert padded.shape == (3, 24, 24)
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    background = (torch.tensor([round(255 * m) for m in IMAGENET_MEAN]).view(3, 1, 1) / 255 - mean) / std
    red = (torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1) - mean) / std
    torch.testing.assert_close(padded[:, :8], background.expand(3, 8, 24), atol=1e-5, rtol=0)
    torch.testing.assert_close(padded[:, 8:16], red.expand(3, 8, 24), atol=1e-5, rtol=0)
    torch.testing.assert_close(padded[:, 16:], background.expand(3, 8, 24), atol=1e-5, rtol=0)
    stretched = ImageProcessor(size=24)(wide)
    torch.testing.assert_close(stretched, red.expand(3, 24, 24), atol=1e-5, rtol=0)  # no padding: all red


def test_the_image_recipes_pad_their_images(llama_base: Path) -> None:
    recipe = load_recipe(RECIPES / "image-stage2-decoupled.yaml")
    assert recipe.model.image_aspect_ratio == "pad"
    model = build_model(llama_base, [tiny_spec("image")], strategy="decoupled", rank=2,
                        processor_options=recipe.model.processor_options())
    assert model.spec.modalities[0].processor.options["pad_to_square"] is True
    assert isinstance(model.processors["image"], ImageProcessor) and model.processors["image"].pad_to_square
    assert load_recipe(RECIPES / "image-stage1.yaml").model.processor_options() == {}  # LLaVA's stage 1 does not pad
