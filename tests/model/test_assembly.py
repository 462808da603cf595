"""Sequence assembly: routes, labels, padding, positions, and the errors for bad prompts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mmcompose.errors import InputError
from mmcompose.model import Example, MultimodalLLM
from mmcompose.model.assembly import IGNORE_INDEX
from tests.model.helpers import random_input, tiny_modality


@pytest.fixture(scope="module")
def model(llama_base: Path) -> MultimodalLLM:
    return MultimodalLLM.from_base(llama_base, [tiny_modality("image", boundary=2), tiny_modality("point")],
                                   strategy="decoupled")


def _image(seed: int = 0) -> torch.Tensor:
    return random_input("image", torch.Generator().manual_seed(seed))


def test_layout_routes_labels_and_boundary_tokens(model: MultimodalLLM) -> None:
    image_tokens = 4 + 2 + 2  # (16/8)^2 patches + 2 prefix + 2 suffix
    example = Example(prompt="USER: <image> red? ASSISTANT:", inputs={"image": [_image()]}, target=" yes")
    batch = model.assemble([example])
    tokenizer = model.tokenizer
    before = tokenizer("USER: ", add_special_tokens=False).input_ids
    after = tokenizer(" red? ASSISTANT:", add_special_tokens=False).input_ids
    target = [*tokenizer(" yes", add_special_tokens=False).input_ids, tokenizer.eos_token_id]
    expected_routes = [0] * (1 + len(before)) + [1] * image_tokens + [0] * (len(after) + len(target))
    assert batch.routes[0].tolist() == expected_routes
    expected_labels = [IGNORE_INDEX] * (len(expected_routes) - len(target)) + target
    assert batch.labels[0].tolist() == expected_labels
    assert batch.attention_mask.all() and batch.position_ids[0].tolist() == list(range(len(expected_routes)))
    start = 1 + len(before)
    prefix = model.branches["image"].prefix.detach()
    torch.testing.assert_close(batch.embeds[0, start:start + 2], prefix)


def test_padding_sides_and_positions(model: MultimodalLLM) -> None:
    short, long = Example(prompt="USER: hi"), Example(prompt="USER: <image> what is this? ASSISTANT:",
                                                       inputs={"image": [_image()]})
    for side in ("left", "right"):
        batch = model.assemble([short, long], padding_side=side)
        length = int(batch.attention_mask[0].sum())
        row = batch.attention_mask[0].tolist()
        padding = [0] * (len(row) - length)
        assert row == (padding + [1] * length if side == "left" else [1] * length + padding)
        kept = batch.position_ids[0][batch.attention_mask[0].bool()]
        assert kept.tolist() == list(range(length))
        assert batch.labels is None


def test_padding_does_not_change_logits(model: MultimodalLLM) -> None:
    long = Example(prompt="USER: <image> what is this? ASSISTANT:", inputs={"image": [_image()]})
    short = Example(prompt="USER: hi")
    with torch.no_grad():
        alone = model(model.assemble([long])).logits[0]
        for side in ("left", "right"):
            batch = model.assemble([short, long], padding_side=side)
            torch.testing.assert_close(model(batch).logits[1], alone, rtol=1e-5, atol=1e-5)


def test_inputs_of_one_modality_keep_their_order(model: MultimodalLLM) -> None:
    first, second = _image(1), _image(2)
    batch = model.assemble([Example(prompt="<image> and <image>", inputs={"image": [first, second]})])
    encoded = model.branches["image"](torch.stack([first, second]))
    image_rows = batch.embeds[0][batch.routes[0] == 1]
    torch.testing.assert_close(image_rows, encoded.flatten(0, 1))


@pytest.mark.parametrize(
    ("example", "message"),
    [
        (Example(prompt="USER: <image> <image>", inputs={"image": [_image()]}, id="s7"),
         "s7: prompt has 2 <image> placeholder(s) but 1 image input(s) were given"),
        (Example(prompt="USER: no placeholder", inputs={"image": [_image()]}),
         "sample 0: prompt has 0 <image> placeholder(s) but 1 image input(s) were given"),
        (Example(prompt="USER: <audio>", inputs={"audio": [torch.zeros(1600)]}, id="a"),
         "a: input of modality 'audio', which this model does not have (it has: image, point)"),
        (Example(prompt="word " * 600, id="long"), "long: sequence of"),
    ],
)
def test_bad_prompts_fail_with_their_message(model: MultimodalLLM, example: Example, message: str) -> None:
    with pytest.raises(InputError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        model.assemble([example])


def test_unknown_modality_in_raw_inputs(model: MultimodalLLM) -> None:
    with pytest.raises(InputError, match="v1: input of modality 'video', which this model does not have"):
        model.example("<video>", {"video": ["clip.mp4"]}, id="v1")
