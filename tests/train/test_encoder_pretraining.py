"""LLM-free encoder pretraining (stage 1's first part): classes, learning, and how `train` runs it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from mmcompose.errors import MMComposeError
from mmcompose.model.assembly import Example
from mmcompose.train.encoder import caption_classes, pretrain_encoder
from mmcompose.train.trainer import LearningRates, TrainConfig, build_model, load_config, train
from tests.train.conftest import interrupt_after, samples, saved_tensors, tiny_spec


class MeanEncoder(nn.Module):
    """(B, 4) -> (B, 2 tokens, 8): small enough to check learning exactly."""

    output_dim = 8

    def __init__(self) -> None:
        super().__init__()
        self.project = nn.Linear(4, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(x).view(len(x), 2, 8)


def example(target: str, **inputs: list[torch.Tensor]) -> Example:
    return Example(prompt="", inputs=inputs, target=target)


def test_classes_are_the_distinct_targets_of_single_input_examples() -> None:
    a, b, c = torch.zeros(4), torch.ones(4), torch.full((4,), 2.0)
    examples = [example("This is a cat.", image=[a]), example("This is a dog.", image=[b]),
                example("This is a cat.", image=[c]), example("two", image=[a, b]), example("sound", audio=[a]),
                example("both", image=[a], audio=[b])]
    inputs, labels, count = caption_classes(examples, "image")
    assert count == 2 and labels == [0, 1, 0]
    assert [torch.equal(x, y) for x, y in zip(inputs, [a, b, c], strict=True)] == [True] * 3
    with pytest.raises(MMComposeError, match="at least two different targets, found 1"):
        caption_classes(examples, "audio")


def test_pretraining_separates_classes_and_is_seeded() -> None:
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 4, generator=generator) * 2
    labels = [i % 3 for i in range(30)]
    inputs = [centres[k] + 0.1 * torch.randn(4, generator=generator) for k in labels]
    encoders = []
    for _ in range(2):
        torch.manual_seed(1)
        encoder = MeanEncoder()
        loss = pretrain_encoder(encoder, inputs, labels, 3, steps=200, batch_size=8, lr=1e-2, seed=5)
        encoders.append(encoder)
    assert loss < 0.1 < torch.log(torch.tensor(3.0)).item()  # chance is ln 3 ~ 1.1
    assert all(torch.equal(p, q) for p, q in zip(encoders[0].parameters(), encoders[1].parameters(), strict=True))
    with pytest.raises(MMComposeError, match="at least one step"):
        pretrain_encoder(MeanEncoder(), inputs, labels, 3, steps=0, batch_size=8, lr=1e-2, seed=5)


def test_train_pretrains_the_encoder_first_even_when_stage1_freezes_it(llama_base: Path, world: Path,
                                                                        tmp_path: Path) -> None:
    data = samples(world, "point_caption", 8)
    settings = TrainConfig(stage="pretrain", batch_size=4, steps=2, train_encoder=False, encoder_steps=5,
                           lr=LearningRates(encoder=1e-3, connector=1e-3, boundary=1e-3))
    runs = {}
    for name, steps in (("with", 5), ("without", 0)):
        model = build_model(llama_base, [tiny_spec("point")], strategy="connector-only", seed=0)
        before = {k: v.clone() for k, v in model.branches["point"].encoder.state_dict().items()}
        metrics = train(model, data, world, settings.model_copy(update={"encoder_steps": steps}),
                        tmp_path / name, progress=False)
        after = model.branches["point"].encoder.state_dict()
        runs[name] = (metrics, any(not torch.equal(v, after[k]) for k, v in before.items()))
    assert runs["with"][1] and not runs["without"][1]
    assert set(runs["with"][0]["encoder_pretraining_loss"]) == {"point"}
    assert runs["without"][0]["encoder_pretraining_loss"] == {}


def test_encoder_steps_belong_to_the_pretrain_stage() -> None:
    with pytest.raises(MMComposeError, match="encoder_steps belongs to the pretrain stage"):
        load_config(stage="instruct", encoder_steps=10)


def test_resume_after_encoder_pretraining_gives_the_uninterrupted_weights(llama_base: Path, world: Path,
                                                                          tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    data = samples(world, "point_caption", 8)
    settings = TrainConfig(stage="pretrain", batch_size=4, steps=4, save_every=2, train_encoder=False,
                           encoder_steps=5, lr=LearningRates(encoder=1e-3, connector=1e-3, boundary=1e-3))
    train(build_model(llama_base, [tiny_spec("point")], strategy="connector-only", seed=0), data, world, settings,
          tmp_path / "full", progress=False)
    interrupt_after(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        train(build_model(llama_base, [tiny_spec("point")], strategy="connector-only", seed=0), data, world,
              settings, tmp_path / "cut", progress=False)
    monkeypatch.undo()
    # Fresh parameters from another seed: the pretrained encoder must come from the step checkpoint.
    resumed = train(build_model(llama_base, [tiny_spec("point")], strategy="connector-only", seed=7), data, world,
                    settings, tmp_path / "cut", resume=True, progress=False)
    assert resumed["resumed_from_step"] == 2 and resumed["encoder_pretraining_loss"] == {}
    expected, found = saved_tensors(tmp_path / "full"), saved_tensors(tmp_path / "cut")
    assert all(torch.equal(expected[k], found[k]) for k in expected)
