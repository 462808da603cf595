"""`mmcompose train base` and `mmcompose train modality` from the command line."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from mmcompose.checkpoint import load_checkpoint
from mmcompose.cli import app
from mmcompose.train.base_llm import BASE_PROFILES
from tests.train.test_base_llm import TINY


def test_train_base_command(world: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(BASE_PROFILES, "small", TINY)
    result = CliRunner().invoke(app, ["train", "base", "--world", str(world), "-o", str(tmp_path / "base"),
                                      "--profile", "small", "--seed", "2"])
    assert result.exit_code == 0, result.output
    assert "text QA accuracy" in result.output and (tmp_path / "base" / "metrics.json").is_file()


def test_train_modality_commands(llama_base: Path, world: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    common = ["train", "modality", "--base", str(llama_base), "--modality", "point", "--data-root", str(world),
              "--steps", "2", "--batch-size", "2"]
    stage1 = runner.invoke(app, [*common, "--data", str(world / "data" / "point_caption.json"), "--stage",
                                 "pretrain", "-o", str(tmp_path / "stage1")])
    assert stage1.exit_code == 0, stage1.output
    assert "connector-only" in stage1.output
    (tmp_path / "stage2.yaml").write_text("stage: instruct\nlr: {deltas: 0.002}\nsave_every: 1\n")
    stage2 = runner.invoke(app, [*common, "--data", str(world / "data" / "point_instruct.json"), "--config",
                                 str(tmp_path / "stage2.yaml"), "--strategy", "decoupled", "--rank", "2",
                                 "--from", str(tmp_path / "stage1" / "model"), "-o", str(tmp_path / "stage2")])
    assert stage2.exit_code == 0, stage2.output
    model = load_checkpoint(tmp_path / "stage2" / "model")
    assert model.spec.strategy == "decoupled" and [d.name for d in model.spec.deltas] == ["language", "point"]
    assert (tmp_path / "stage2" / "checkpoints" / "step-1").is_dir()

    missing = runner.invoke(app, [*common, "--data", str(tmp_path / "nothing.json"), "--stage", "pretrain",
                                  "-o", str(tmp_path / "x")])
    assert missing.exit_code == 2
    assert missing.output.strip().splitlines() == [f"error: {tmp_path / 'nothing.json'}: data file not found"]
    no_strategy = runner.invoke(app, [*common, "--data", str(world / "data" / "point_instruct.json"), "--stage",
                                      "instruct", "-o", str(tmp_path / "y")])
    assert no_strategy.exit_code == 2
    assert no_strategy.output.strip() == "error: --strategy is required for the instruct stage"
