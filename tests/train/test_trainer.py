"""Modality-model training: what each stage trains, stage 1 -> stage 2, exact resume, joint training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mmcompose.checkpoint import load_checkpoint
from mmcompose.errors import MMComposeError
from mmcompose.train.trainer import LearningRates, TrainConfig, build_model, load_config, step_checkpoints, train
from tests.train.conftest import interrupt_after, samples, saved_tensors, tiny_spec

FAST = LearningRates(encoder=3e-3, connector=3e-3, boundary=3e-3, deltas=3e-3)


def config(**changes: object) -> TrainConfig:
    return TrainConfig.model_validate({"stage": "instruct", "batch_size": 4, "steps": 6, "lr": FAST,
                                       "warmup_ratio": 0.0, "log_every": 1, **changes})


def test_stage1_then_stage2_lowers_the_loss_and_trains_only_its_parameters(llama_base: Path, world: Path,
                                                                           tmp_path: Path) -> None:
    stage1 = build_model(llama_base, [tiny_spec("image")], strategy="connector-only", seed=0)
    llm_before = {k: v.clone() for k, v in stage1.llm.state_dict().items()}
    first = train(stage1, samples(world, "image_caption", 16), world,
                  config(stage="pretrain", steps=16, lr=LearningRates(encoder=1e-2, connector=1e-2, boundary=1e-2)),
                  tmp_path / "stage1", progress=False)
    assert first["final_loss"] < first["first_loss"]
    assert all(torch.equal(v, stage1.llm.state_dict()[k]) for k, v in llm_before.items())

    stage2 = build_model(llama_base, ["image"], strategy="decoupled", rank=4, alpha=8.0,
                         start_from=[tmp_path / "stage1" / "model"], seed=1)
    assert stage2.spec.modalities == stage1.spec.modalities
    branch = {k: v for k, v in stage2.checkpoint_tensors().items() if k.startswith("modalities.")}
    assert all(torch.equal(v, saved_tensors(tmp_path / "stage1")[k]) for k, v in branch.items())
    second = train(stage2, samples(world, "image_instruct", 16), world, config(steps=16), tmp_path / "stage2",
                   progress=False)
    assert second["final_loss"] < second["first_loss"]
    saved = saved_tensors(tmp_path / "stage2")
    assert any(k.startswith("deltas.image.") and v.abs().sum() > 0 for k, v in saved.items() if ".lora_B" in k)
    assert any(k.startswith("deltas.language.") and v.abs().sum() > 0 for k, v in saved.items() if ".lora_B" in k)
    loaded = load_checkpoint(tmp_path / "stage2" / "model")
    assert all(torch.equal(v, saved[k]) for k, v in loaded.checkpoint_tensors().items())
    assert [s["stage"] for s in loaded.provenance["stages"]] == ["pretrain", "instruct"]
    log = [json.loads(line) for line in (tmp_path / "stage2" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 17))


def test_pretrain_freezes_deltas_and_can_freeze_the_encoder(llama_base: Path, world: Path, tmp_path: Path) -> None:
    model = build_model(llama_base, [tiny_spec("audio")], strategy="shared", rank=2, alpha=4.0, seed=0)
    before = {k: v.clone() for k, v in model.checkpoint_tensors().items()}
    train(model, samples(world, "audio_caption", 8), world, config(stage="pretrain", steps=2, train_encoder=False),
          tmp_path / "run", progress=False)
    after = saved_tensors(tmp_path / "run")
    changed = {k for k, v in before.items() if not torch.equal(v, after[k])}
    assert changed and all(k.startswith(("modalities.audio.connector.", "modalities.audio.prefix",
                                         "modalities.audio.suffix")) for k in changed)


def test_resume_gives_exactly_the_uninterrupted_weights(llama_base: Path, world: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    data = samples(world, "image_instruct", 12)
    settings = config(steps=7, save_every=2, keep_last=1, seed=3, weight_decay=0.01, warmup_ratio=0.3, log_every=3)
    spec = tiny_spec("image")
    full = train(build_model(llama_base, [spec], strategy="decoupled", rank=2, alpha=4.0, seed=0), data, world,
                 settings, tmp_path / "full", progress=False)

    interrupt_after(monkeypatch, 4)
    with pytest.raises(KeyboardInterrupt):
        train(build_model(llama_base, [spec], strategy="decoupled", rank=2, alpha=4.0, seed=0), data, world,
              settings, tmp_path / "cut", progress=False)
    monkeypatch.undo()
    assert [p.name for p in step_checkpoints(tmp_path / "cut")] == ["step-2", "step-4"]  # killed before pruning
    with pytest.raises(MMComposeError, match="resume"):
        train(build_model(llama_base, [spec], strategy="decoupled", rank=2, alpha=4.0, seed=0), data, world,
              settings, tmp_path / "cut", progress=False)

    # A different seed for the fresh parameters: everything must come from the step checkpoint.
    resumed = train(build_model(llama_base, [spec], strategy="decoupled", rank=2, alpha=4.0, seed=9), data, world,
                    settings, tmp_path / "cut", resume=True, progress=False)
    assert resumed["resumed_from_step"] == 4
    expected, found = saved_tensors(tmp_path / "full"), saved_tensors(tmp_path / "cut")
    assert expected.keys() == found.keys()
    assert all(torch.equal(expected[k], found[k]) for k in expected)
    losses = [[r["loss"] for r in map(json.loads, (tmp_path / run / "log.jsonl").read_text().splitlines())]
              for run in ("full", "cut")]
    assert losses[0] == losses[1] and full["final_loss"] == resumed["final_loss"]


def test_resume_refuses_other_settings(llama_base: Path, world: Path, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    data = samples(world, "image_instruct", 8)
    interrupt_after(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        train(build_model(llama_base, [tiny_spec("image")], strategy="shared", rank=2, seed=0), data, world,
              config(steps=3, save_every=1), tmp_path / "run", progress=False)
    monkeypatch.undo()
    with pytest.raises(MMComposeError, match="other settings"):
        train(build_model(llama_base, [tiny_spec("image")], strategy="shared", rank=2, seed=0), data, world,
              config(steps=3, save_every=1, seed=1), tmp_path / "run", resume=True, progress=False)


def test_joint_training_over_several_modalities(llama_base: Path, world: Path, tmp_path: Path) -> None:
    data = samples(world, "image_instruct", 6) + samples(world, "point_instruct", 6)
    model = build_model(llama_base, [tiny_spec("image"), tiny_spec("point")], strategy="decoupled", rank=2,
                        seed=0)
    metrics = train(model, data, world, config(steps=3), tmp_path / "joint", progress=False)
    assert metrics["modalities"] == ["image", "point"]
    saved = saved_tensors(tmp_path / "joint")
    for delta in ("language", "image", "point"):
        assert any(v.abs().sum() > 0 for k, v in saved.items() if k.startswith(f"deltas.{delta}.") and "lora_B" in k)


def test_build_model_takes_each_branch_from_its_stage1(llama_base: Path, world: Path, tmp_path: Path) -> None:
    for name in ("image", "audio"):
        model = build_model(llama_base, [tiny_spec(name)], strategy="connector-only", seed=0)
        train(model, samples(world, f"{name}_caption", 4), world, config(stage="pretrain", steps=1),
              tmp_path / name, progress=False)
    joint = build_model(llama_base, ["audio", "image"], strategy="shared", rank=2,
                        start_from=[tmp_path / "image" / "model", tmp_path / "audio" / "model"])
    own = joint.checkpoint_tensors()
    for name in ("image", "audio"):
        for key, value in saved_tensors(tmp_path / name).items():
            assert torch.equal(own[key], value)
    with pytest.raises(MMComposeError, match="'point' is in none"):
        build_model(llama_base, ["image", "point"], strategy="shared", start_from=[tmp_path / "image" / "model"])


def test_bad_inputs_are_one_line_errors(llama_base: Path, world: Path, tmp_path: Path) -> None:
    model = build_model(llama_base, [tiny_spec("image")], strategy="shared", rank=2)
    audio = samples(world, "audio_caption", 4)
    with pytest.raises(MMComposeError, match="modality 'audio'"):
        train(model, audio, world, config(), tmp_path / "a", progress=False)
    with pytest.raises(MMComposeError, match="fewer than one global batch"):
        train(model, samples(world, "image_caption", 2), world, config(), tmp_path / "b", progress=False)
    missing = [{**audio[0], "modal_inputs": {"image": ["media/image/nothing.png"]}}]
    with pytest.raises(MMComposeError, match="file not found"):
        train(model, missing, world, config(batch_size=1), tmp_path / "c", progress=False)
    with pytest.raises(MMComposeError, match="batch_size"):
        load_config(None, stage="instruct", batch_size=0)
    (tmp_path / "bad.yaml").write_text("stage: instruct\nlearning_rate: 3\n")
    with pytest.raises(MMComposeError, match="learning_rate"):
        load_config(tmp_path / "bad.yaml")


@pytest.mark.parametrize("strategy", ["full", "connector-only"])
def test_other_strategies_train_what_they_have(llama_base: Path, world: Path, tmp_path: Path, strategy: str) -> None:
    model = build_model(llama_base, [tiny_spec("video")], strategy=strategy, seed=0)
    before = {k: v.clone() for k, v in model.checkpoint_tensors().items()}
    train(model, samples(world, "video_instruct", 4), world, config(steps=2), tmp_path / "run", progress=False)
    changed = {k.split(".")[0] for k, v in saved_tensors(tmp_path / "run").items() if not torch.equal(v, before[k])}
    assert changed == ({"modalities", "deltas"} if strategy == "full" else {"modalities"})
