"""Training under `accelerate launch` with two processes (DDP over gloo on CPU), through the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmcompose.checkpoint import load_checkpoint


@pytest.mark.slow
def test_two_process_joint_training_saves_a_loadable_checkpoint(llama_base: Path, world: Path,
                                                                tmp_path: Path) -> None:
    accelerate = Path(sys.executable).with_name("accelerate")
    out = tmp_path / "ddp"
    command = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "mmcompose.cli", "train", "modality",
               "--base", str(llama_base), "--modality", "image,point", "--data-root", str(world),
               "--data", str(world / "data" / "image_instruct.json"),
               "--data", str(world / "data" / "point_instruct.json"),
               "--stage", "instruct", "--strategy", "decoupled", "--rank", "2", "--steps", "4", "--batch-size", "2",
               "--save-every", "2", "-o", str(out)]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=environment, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("trained image+point") == 1  # only the main process reports
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["processes"] == 2 and metrics["global_batch"] == 4
    model = load_checkpoint(out / "model")
    saved = load_file(out / "model" / "model.safetensors")
    assert all(torch.equal(value, saved[key]) for key, value in model.checkpoint_tensors().items())
    assert any(value.abs().sum() > 0 for key, value in saved.items() if key.startswith("deltas.point.")
               and "lora_B" in key)
    assert (out / "checkpoints" / "step-2" / "optimizer.safetensors").is_file()
