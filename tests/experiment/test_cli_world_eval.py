"""`mmcompose world build` and `mmcompose eval` on a quick world with a tiny untrained model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mmcompose.checkpoint import save_checkpoint
from mmcompose.cli import app
from mmcompose.model import MultimodalLLM

runner = CliRunner()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("w") / "world"
    result = runner.invoke(app, ["world", "build", "--seed", "3", "--profile", "small", "-o", str(out)])
    assert result.exit_code == 0, result.output
    return out


def test_world_build_refuses_an_existing_directory(world: Path) -> None:
    again = runner.invoke(app, ["world", "build", "--profile", "small", "-o", str(world)])
    assert again.exit_code == 2 and "already exists" in again.output


def test_eval_a_file_and_a_directory(world: Path, llama_base: Path, tmp_path: Path) -> None:
    checkpoint = save_checkpoint(MultimodalLLM.from_base(llama_base, ["image"]), tmp_path / "image-model")
    test_file = world / "data" / "image_test.json"
    result = runner.invoke(app, ["eval", "--task", str(test_file), "--model", str(checkpoint), "-o",
                                 str(tmp_path / "single"), "--max-new-tokens", "3"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "single" / "metrics.json").read_text())
    samples = json.loads(test_file.read_text())
    assert metrics["n"] == len(samples) and metrics["n_failed"] == 0
    assert len((tmp_path / "single" / "predictions.jsonl").read_text().splitlines()) == len(samples)

    # MCUB needs four modalities: an image-only model fails every sample, recorded one by one, run completes.
    result = runner.invoke(app, ["eval", "--task", str(world / "data"), "--model", str(checkpoint), "-o",
                                 str(tmp_path / "mcub"), "--max-new-tokens", "2"])
    assert result.exit_code == 0, result.output
    mcub4 = json.loads((tmp_path / "mcub" / "MCUB-4" / "metrics.json").read_text())
    assert mcub4["n_failed"] == mcub4["n"] > 0 and mcub4["accuracy"] == 0
    record = json.loads((tmp_path / "mcub" / "MCUB-4" / "predictions.jsonl").read_text().splitlines()[0])
    assert "input of modality 'audio', which this model does not have" in record["error"]


def test_eval_bad_input(world: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["eval", "--task", str(world / "data" / "image_test.json"), "--model",
                                 str(tmp_path / "none"), "-o", str(tmp_path / "o"), "--shard", "x"])
    assert result.exit_code == 2 and "--shard 'x'" in result.output
    result = runner.invoke(app, ["eval", "--task", str(world / "data" / "image_test.json"), "--model",
                                 str(tmp_path / "none"), "-o", str(tmp_path / "o")])
    assert result.exit_code == 2 and "not an mmcompose checkpoint" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_label_kind_with_the_embedding_judge(world: Path, llama_base: Path, tmp_path: Path) -> None:
    from mmcompose.eval.predict import embedding_similarity

    model = MultimodalLLM.from_base(llama_base, ["point"])
    scores = embedding_similarity(model)("night stand", ["chair", "night stand", "table"])
    assert max(range(3), key=scores.__getitem__) == 1 and abs(scores[1] - 1) < 1e-6
    checkpoint = save_checkpoint(model, tmp_path / "point-model")
    point = sorted((world / "media" / "point").iterdir())[0].relative_to(world)
    benchmark = [{"id": f"m{i}", "conversations": [{"from": "human", "value": "<point>\nWhat object is this?"},
                                                    {"from": "gpt", "value": label}],
                  "modal_inputs": {"point": [str(point)]}} for i, label in enumerate(["chair", "night_stand"])]
    (tmp_path / "modelnet.json").write_text(json.dumps(benchmark))
    common = ["eval", "--task", str(tmp_path / "modelnet.json"), "--model", str(checkpoint), "--data-root",
              str(world), "--kind", "label", "--max-new-tokens", "3"]
    result = runner.invoke(app, [*common, "-o", str(tmp_path / "judged"), "--judge", "embedding"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "judged" / "metrics.json").read_text())
    assert metrics["n"] == 2 and metrics["n_unparseable"] == 0  # the embedding judge always picks a label
    bad = runner.invoke(app, [*common, "-o", str(tmp_path / "x"), "--judge", "gpt4"])
    assert bad.exit_code == 2 and "--judge 'gpt4'" in bad.output
