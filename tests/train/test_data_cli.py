"""`mmcompose train modality` with bad samples (stop / skip), DataLoader workers and the feature cache."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from mmcompose.cli import app


def test_bad_samples_stop_before_training_or_are_skipped_and_counted(llama_base: Path, world: Path,
                                                                      tmp_path: Path) -> None:
    records = json.loads((world / "data" / "point_caption.json").read_text())[:8]
    records.insert(3, {**records[0], "id": "lost", "modal_inputs": {"point": ["media/point/none.npy"]}})
    data = tmp_path / "points.json"
    data.write_text(json.dumps(records))
    (tmp_path / "frozen.yaml").write_text("train_encoder: false\n")
    common = ["train", "modality", "--base", str(llama_base), "--modality", "point", "--data", str(data),
              "--data-root", str(world), "--stage", "pretrain", "--steps", "2", "--batch-size", "2"]
    runner = CliRunner()
    stopped = runner.invoke(app, [*common, "-o", str(tmp_path / "stopped")])
    assert stopped.exit_code == 2
    assert stopped.output.strip().splitlines() == [
        f"error: {data}: sample #3 (id 'lost'): modal_inputs.point: point file not found: "
        f"{world / 'media/point/none.npy'}"]
    assert not (tmp_path / "stopped").exists()

    skipped = runner.invoke(app, [*common, "--on-bad-sample", "skip", "--num-workers", "1", "--config",
                                  str(tmp_path / "frozen.yaml"), "--cache-features", str(tmp_path / "cache"),
                                  "-o", str(tmp_path / "run")])
    assert skipped.exit_code == 0, skipped.output
    assert "skipped 1 invalid and 0 too long sample(s)" in skipped.output
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["samples"] == 8 and metrics["skipped_samples"] == {"invalid": 1, "too_long": 0}
    assert metrics["feature_cache"]["point"]["computed"] > 0
    assert (tmp_path / "run" / "skipped_samples.txt").read_text().splitlines() == [
        f"{data}: sample #3 (id 'lost'): modal_inputs.point: point file not found: {world / 'media/point/none.npy'}"]
    assert list((tmp_path / "cache").glob("point-*/shard-*.safetensors"))

    wrong = runner.invoke(app, [*common, "--on-bad-sample", "ignore", "-o", str(tmp_path / "wrong")])
    assert wrong.exit_code == 2 and "--on-bad-sample: Input should be 'stop' or 'skip'" in wrong.output
