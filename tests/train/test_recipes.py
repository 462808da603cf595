"""Every recipe in recipes/ loads and builds its model on a tiny random base of the same structure (same target
modules, ranks, boundary tokens, connector), and `train modality --recipe` runs one with overrides."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mmcompose.model.routed import RoutedLinear
from mmcompose.train.recipe import load_recipe
from mmcompose.train.run import parse_connector
from mmcompose.train.trainer import build_model, parameter_groups
from tests.model.helpers import TINY_ENCODERS

RECIPES = sorted((Path(__file__).resolve().parents[2] / "recipes").glob("*.yaml"))
SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_there_is_a_recipe_per_modality_stage_and_strategy() -> None:
    assert {path.stem for path in RECIPES} == {
        f"{m}-{s}" for m in ("image", "audio", "video", "point")
        for s in ("stage1", "stage2-shared", "stage2-decoupled")}


@pytest.mark.parametrize("path", RECIPES, ids=[path.stem for path in RECIPES])
def test_recipe_builds_its_model_on_a_tiny_base_of_the_same_structure(path: Path, llama_base: Path) -> None:
    recipe = load_recipe(path)
    described, settings = recipe.model, recipe.train
    (modality,) = described.modalities
    assert "--recipe recipes/" + path.name in recipe.launch and "GB per GPU" in recipe.gpu_memory
    model = build_model(llama_base, described.modalities, strategy=described.strategy, rank=described.rank,
                        alpha=described.alpha, template=described.template,
                        encoders={modality: TINY_ENCODERS[modality]}, connector=parse_connector(described.connector),
                        boundary_tokens=described.boundary_tokens, target_modules=described.target_modules)
    branch = model.branches[modality]
    assert model.spec.modalities[0].connector.type == described.connector
    assert settings.mixed_precision == "bf16" and settings.gradient_checkpointing and settings.data.max_length == 2048
    assert settings.warmup_ratio == 0.03 and settings.weight_decay == 0.0 and settings.train_encoder is False
    if settings.stage == "pretrain":
        assert described.strategy == "connector-only" and not model.routed
        assert branch.prefix is None
        return
    assert model.spec.template == "vicuna_v1" and described.rank == 128 and described.alpha == 256
    assert model.spec.target_modules == SEVEN
    layers = model.llm.config.num_hidden_layers
    assert len(model.routed) == 7 * layers and all(isinstance(m, RoutedLinear) for m in model.routed.values())
    expected = {"shared"} if described.strategy == "shared" else {"language", modality}
    for layer in model.routed.values():
        assert set(layer.deltas) == expected
        assert all(delta.lora_A.shape[0] == 128 and delta.scaling == 2.0 for delta in layer.deltas.values())
    hidden = model.llm.config.hidden_size
    if described.strategy == "decoupled":
        assert branch.prefix.shape == branch.suffix.shape == (5, hidden)
    else:
        assert branch.prefix is None and branch.suffix is None
    rates = {group["name"]: group["lr"] for group in parameter_groups(model, settings)}
    assert rates["connector"] == 2e-5
    if modality == "image":  # the vicuna-7b-v1.5 image recipe: 8 GPUs x 4 x 4 = 128, 2e-4 / 2e-5
        assert settings.batch_size * settings.grad_accum * 8 == 128 and rates["deltas"] == 2e-4
        if described.strategy == "decoupled":
            assert rates["language"] == 2e-5


def test_train_modality_runs_a_recipe_with_overrides(llama_base: Path, world: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    command = [sys.executable, "-m", "mmcompose.cli", "train", "modality",
               "--recipe", str(RECIPES[0].parent / "image-stage1.yaml"), "--base", str(llama_base),
               "--encoder", 'image=image-patch:{"image_size": 32, "patch_size": 8, "width": 16, "depth": 1, '
                            '"heads": 2}',
               "--data", str(world / "data" / "image_caption.json"), "--data-root", str(world),
               "--steps", "2", "--batch-size", "2", "--mixed-precision", "no", "-o", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 2 and metrics["global_batch"] == 2 and metrics["mixed_precision"] == "no"
    manifest = json.loads((out / "model" / "manifest.json").read_text())
    stage = manifest["provenance"]["stages"][-1]["config"]
    assert stage["gradient_checkpointing"] is True and stage["lr"]["connector"] == 1e-3
    assert manifest["model"]["modalities"][0]["connector"]["type"] == "mlp2x_gelu"
    assert manifest["model"]["template"] == "plain"

    bad = subprocess.run([*command[:-2], "-o", str(tmp_path / "bad"), "--connector", "nope"], capture_output=True,
                         text=True, timeout=300, check=False, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert bad.returncode != 0 and "unknown connector" in bad.stderr + bad.stdout
    assert "Traceback" not in bad.stderr and not (tmp_path / "bad").exists()
