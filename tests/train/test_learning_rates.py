"""A learning rate per delta role: the language delta (text tokens only) apart from the deltas that serve
modality tokens (modality deltas, and `shared`, which serves both), and `--language-lr` on the command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mmcompose.cli import app
from mmcompose.train.trainer import LearningRates, TrainConfig, build_model, parameter_groups, train
from tests.train.conftest import samples, tiny_spec

RATES = LearningRates(encoder=0.0, connector=1e-4, boundary=1e-4, deltas=2e-4, language=2e-5)


def _groups(model, lr: LearningRates) -> dict[str, tuple[float, set[int]]]:
    groups: dict[str, tuple[float, set[int]]] = {}
    for group in parameter_groups(model, TrainConfig(stage="instruct", train_encoder=False, lr=lr)):
        rate, members = groups.get(group["name"], (group["lr"], set()))
        assert rate == group["lr"]
        groups[group["name"]] = (rate, members | {id(p) for p in group["params"]})
    return groups


def _delta_parameters(model, name: str) -> set[int]:
    return {id(p) for layer in model.routed.values() if name in layer.deltas
            for p in layer.deltas[name].parameters()}


def test_the_language_delta_gets_its_own_rate(llama_base: Path) -> None:
    model = build_model(llama_base, [tiny_spec("image")], strategy="decoupled", rank=2, alpha=4.0)
    groups = _groups(model, RATES)
    assert groups["language"] == (2e-5, _delta_parameters(model, "language"))
    assert groups["deltas"] == (2e-4, _delta_parameters(model, "image"))
    assert groups["connector"][0] == 1e-4 and groups["boundary"][0] == 1e-4
    # Without a language rate the deltas train together, as one group, at `deltas`.
    together = _groups(model, RATES.model_copy(update={"language": None}))
    assert "language" not in together
    assert together["deltas"] == (2e-4, _delta_parameters(model, "image") | _delta_parameters(model, "language"))


def test_a_shared_delta_trains_at_the_modality_rate(llama_base: Path) -> None:
    """`shared` serves modality tokens too, so it is not a language delta (NaiveMC trains it at the main rate)."""
    model = build_model(llama_base, [tiny_spec("audio")], strategy="shared", rank=2, alpha=4.0)
    groups = _groups(model, RATES)
    assert "language" not in groups and groups["deltas"] == (2e-4, _delta_parameters(model, "shared"))


def test_language_lr_from_the_command_line(llama_base: Path, world: Path, tmp_path: Path) -> None:
    data = tmp_path / "instruct.json"
    data.write_text(json.dumps(samples(world, "image_instruct", 8)))
    stage1 = tmp_path / "stage1"
    train(build_model(llama_base, [tiny_spec("image")], strategy="connector-only"),
          samples(world, "image_caption", 8), world,
          TrainConfig(stage="pretrain", steps=1, batch_size=4, lr=RATES), stage1, progress=False)
    result = CliRunner().invoke(app, [
        "train", "modality", "--base", str(llama_base), "--modality", "image", "--data", str(data), "--data-root",
        str(world), "--stage", "instruct", "--strategy", "decoupled", "--from", str(stage1 / "model"), "--steps", "1",
        "--batch-size", "4", "--lr", "0.001", "--language-lr", "0.0001", "--rank", "2", "-o", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[-1])
    # the cosine schedule's one-step run ends at rate 0; the groups' peak rates are in the saved config
    config = json.loads((tmp_path / "run" / "model" / "manifest.json").read_text())["provenance"]["stages"][-1]
    assert config["config"]["lr"]["language"] == pytest.approx(1e-4) and config["config"]["lr"]["deltas"] == 1e-3
    assert set(record["lr"]) == {"encoder", "connector", "boundary", "deltas", "language"}
