"""Every recipe in recipes/ loads and builds its model on a tiny random base of the same structure (same target
modules, ranks, boundary tokens, connector), and `train modality --recipe` runs one with overrides."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mmcompose.cli import app
from mmcompose.data.dataset import SampleDataset, training_samples
from mmcompose.model import Component
from mmcompose.model.routed import RoutedLinear
from mmcompose.train.recipe import load_recipe
from mmcompose.train.run import parse_connector
from mmcompose.train.trainer import build_model, describe_groups, parameter_groups, train
from tests.conftest import make_base
from tests.model.helpers import TINY_ENCODERS
from tests.train.official_scripts import RECIPE_SCRIPTS, flags, trained_groups

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
    if path.stem in RECIPE_SCRIPTS:  # what trains at which rate, as llava_trainer.py groups it
        rates = {name: group["lr"] for name, group in describe_groups(parameter_groups(model, settings)).items()}
        assert rates == trained_groups(RECIPE_SCRIPTS[path.stem])


NOT_FROM_THE_SCRIPTS = {
    "description", "launch", "gpu_memory",  # documentation (launch: checked for its DeepSpeed stage below)
    "model.encoder",  # the encoder's local path (its kind is the modality's)
    "train.lr",  # checked as trained groups and rates (test above)
    "train.steps", "train.seed", "train.save_every", "train.keep_last", "train.log_every", "train.encoder_steps",
    "train.data.on_bad_sample", "train.data.cache_features",  # not set by the recipes: this trainer's own
}
LORA_FIELDS = {"model.rank", "model.alpha", "model.target_modules", "train.lora_dropout"}


def _fields(value: object, prefix: str = "") -> dict[str, object]:
    """Leaf fields of a dumped recipe by dotted path (a mapping of modality -> path counts as one field)."""
    if isinstance(value, dict) and prefix not in ("model.encoder",):
        found: dict[str, object] = {}
        for key, item in value.items():
            found |= _fields(item, f"{prefix}.{key}" if prefix else key)
        return found
    return {prefix: value}


@pytest.mark.parametrize("stem", sorted(RECIPE_SCRIPTS))
def test_every_recipe_field_is_its_official_script_flag(stem: str) -> None:
    recipe = load_recipe(RECIPES[0].parent / f"{stem}.yaml")
    given = flags(RECIPE_SCRIPTS[stem])
    modality = stem.split("-")[0]
    pretrain = given.get("tune_mm_mlp_adapter", False)
    expected = {
        "model.modalities": [modality],
        "model.strategy": "connector-only" if pretrain else {"same": "shared",
                                                             "modal+language": "decoupled"}[given["lora_strategy"]],
        "model.boundary_tokens": given["local_prefix_tokens"],
        "model.connector": {"mlp2x_gelu": "mlp2x_gelu", "qformer_32N_2L": "qformer"}[given["projector_type"]],
        "model.template": {"plain": "plain", "v1": "vicuna_v1"}[given["version"]],
        "model.image_aspect_ratio": "pad" if given["image_aspect_ratio"] == "pad" and modality == "image" else None,
        "train.stage": "pretrain" if pretrain else "instruct",
        "train.train_encoder": False,  # every script keeps its encoder frozen
        "train.batch_size": given["per_device_train_batch_size"],
        "train.grad_accum": given["gradient_accumulation_steps"],
        "train.epochs": given["num_train_epochs"],
        "train.weight_decay": given["weight_decay"], "train.warmup_ratio": given["warmup_ratio"],
        "train.mixed_precision": "bf16" if given["bf16"] else "no",
        "train.gradient_checkpointing": given["gradient_checkpointing"],
        "train.group_by_length": given["group_by_length"],
        "train.grad_clip": 1.0,  # transformers' Trainer default max_grad_norm, which the scripts keep
        "train.data.max_length": given["model_max_length"], "train.data.num_workers": given["dataloader_num_workers"],
    }
    if not pretrain:
        expected |= {"model.rank": given["lora_r"], "model.alpha": given["lora_alpha"], "model.target_modules": SEVEN,
                     "train.lora_dropout": given["lora_dropout"]}
    fields = _fields(recipe.model_dump(mode="json"))
    covered = set(expected) | NOT_FROM_THE_SCRIPTS | (LORA_FIELDS if pretrain else set())
    assert {f for f in fields if not any(f == c or f.startswith(c + ".") for c in covered)} == set()
    assert {path: fields[path] for path in expected} == expected
    assert f"configs/accelerate/deepspeed_{given['deepspeed']}.yaml --num_processes 8" in recipe.launch
    global_batch = given["per_device_train_batch_size"] * given["gradient_accumulation_steps"] * 8
    assert recipe.train.batch_size * recipe.train.grad_accum * 8 == global_batch


def test_video_stage1_says_it_has_no_official_script() -> None:
    assert "no official script" in load_recipe(RECIPES[0].parent / "video-stage1.yaml").description
    assert {path.stem for path in RECIPES} == set(RECIPE_SCRIPTS) | {"video-stage1"}


def test_dry_run_prints_the_trained_groups_and_rates(llama_base: Path) -> None:
    recipe = RECIPES[0].parent / "image-stage2-decoupled.yaml"
    result = CliRunner().invoke(app, ["train", "modality", "--recipe", str(recipe), "--base", str(llama_base),
                                      "--dry-run", "--encoder",
                                      'image=image-patch:{"image_size": 16, "patch_size": 8, "width": 16, "depth": 1, '
                                      '"heads": 2}'])
    assert result.exit_code == 0, result.output
    lines = {line.split(":")[0].strip(): line for line in result.output.splitlines()[1:]}
    for name, rate in trained_groups("run_finetune_vision_damc.sh").items():
        assert f"lr {rate:g}," in lines[name]
    assert set(lines) == set(trained_groups("run_finetune_vision_damc.sh"))
    assert "LoRA dropout 0.05" in result.output.splitlines()[0]


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


def test_the_video_recipe_trains_samples_of_8_x_257_video_positions(world: Path, tmp_path: Path) -> None:
    """ModelCompose counts `model_max_length` in tokens before the features go in, so its video runs train
    8 frames x 257 LanguageBind tokens (+ 5 + 5 boundary tokens) under 2048; the recipe must not skip them."""
    base = make_base(tmp_path / "base")
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 4096}))  # as vicuna-7b's
    recipe = load_recipe(RECIPES[0].parent / "video-stage2-decoupled.yaml")
    tower = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
             "image_size": 32, "patch_size": 2, "num_frames": 8}  # 16 x 16 patches + CLS = 257 tokens per frame
    encoder = Component(type="languagebind-video", options={"config": tower, "feature_layer": -2})
    described = recipe.model
    model = build_model(base, described.modalities, strategy=described.strategy, rank=4, alpha=8,
                        template=described.template, encoders={"video": encoder},
                        connector=parse_connector(described.connector), boundary_tokens=described.boundary_tokens,
                        target_modules=described.target_modules,
                        processor_options={"video": {"num_frames": 8, "size": 32}})
    records = json.loads((world / "data" / "video_instruct.json").read_text())[:2]
    settings = recipe.train.model_copy(update={"batch_size": 1, "grad_accum": 1, "steps": 1, "mixed_precision": "no",
                                               "gradient_checkpointing": False,
                                               "data": recipe.train.data.model_copy(update={"num_workers": 0})})
    data = SampleDataset(model, training_samples(records, world, model).samples, max_length=2048)
    assert data.positions["video"] == 8 * 257 + 5 + 5
    assert min(model.assembler.sequence_length(data[i], data.positions) for i in range(len(data))) > 2048
    metrics = train(model, records, world, settings, tmp_path / "run", progress=False)
    assert metrics["skipped_samples"] == {"invalid": 0, "too_long": 0} and metrics["samples"] == 2
    assert math.isfinite(metrics["final_loss"]) and metrics["parameter_groups"]["boundary"]["lr"] == 2e-4
