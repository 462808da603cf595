"""Precision and memory: gradient checkpointing through the routed layers, gradient accumulation, mixed precision,
step checkpoints with the trained tensors only, frozen pretrained encoders, and the encoder-width check."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmcompose.data.dataset import SampleDataset, training_samples
from mmcompose.errors import MMComposeError
from mmcompose.model import Component
from mmcompose.train.trainer import (
    TRAINED_TENSORS,
    LearningRates,
    TrainConfig,
    _LossModule,
    build_model,
    step_checkpoints,
    target_tokens,
    train,
)
from tests.model.helpers import randomize_deltas
from tests.train.conftest import interrupt_after, samples, saved_tensors, tiny_spec

FAST = LearningRates(encoder=3e-3, connector=3e-3, boundary=3e-3, deltas=3e-3)


def config(**changes: object) -> TrainConfig:
    return TrainConfig.model_validate({"stage": "instruct", "batch_size": 4, "steps": 3, "lr": FAST,
                                       "warmup_ratio": 0.0, "log_every": 1, **changes})


def gradients(model, examples, *, checkpointing: bool, in_routing: bool) -> dict[str, torch.Tensor]:
    """One backward pass as the trainer does it; `in_routing=False` runs the backward outside the routing."""
    model.zero_grad(set_to_none=True)
    if checkpointing:
        model.llm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    loss, routes = _LossModule(model)(examples, torch.tensor(float(target_tokens(model, examples))))
    if in_routing:
        with model.routing.route(routes):
            loss.backward()
    else:
        loss.backward()
    if checkpointing:
        model.llm.activation_checkpointing_disable()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_gradient_checkpointing_gives_the_gradients_of_the_plain_backward(llama_base: Path, world: Path) -> None:
    model = build_model(llama_base, [tiny_spec("image")], strategy="decoupled", rank=2, alpha=4.0, seed=0)
    randomize_deltas(model, scale=0.2)
    model.requires_grad_(False)
    for layer in model.routed.values():
        layer.deltas.requires_grad_(True)
    data = SampleDataset(model, training_samples(samples(world, "image_instruct", 4), world, model).samples)
    examples = [data[i] for i in range(len(data))]
    plain = gradients(model, examples, checkpointing=False, in_routing=False)
    checkpointed = gradients(model, examples, checkpointing=True, in_routing=True)
    assert plain.keys() == checkpointed.keys() and any(".deltas.image." in name for name in plain)
    for name, value in plain.items():
        torch.testing.assert_close(checkpointed[name], value, rtol=1e-5, atol=1e-7, msg=name)
    # The control: recomputed outside the routing, the layers skip their deltas, which torch notices.
    with pytest.raises(torch.utils.checkpoint.CheckpointError, match="recomputation"):
        gradients(model, examples, checkpointing=True, in_routing=False)


def test_training_with_gradient_checkpointing_reaches_the_same_weights(llama_base: Path, world: Path,
                                                                      tmp_path: Path) -> None:
    data = samples(world, "image_instruct", 8)
    for name, checkpointing in (("plain", False), ("checkpointed", True)):
        model = build_model(llama_base, [tiny_spec("image")], strategy="decoupled", rank=2, alpha=4.0, seed=0)
        train(model, data, world, config(gradient_checkpointing=checkpointing), tmp_path / name, progress=False)
        assert not model.llm.is_activation_checkpointing
    plain, checkpointed = saved_tensors(tmp_path / "plain"), saved_tensors(tmp_path / "checkpointed")
    for key, value in plain.items():
        torch.testing.assert_close(checkpointed[key], value, rtol=0, atol=1e-5, msg=key)


def test_accumulating_two_batches_of_two_reaches_the_weights_of_batches_of_four(llama_base: Path, world: Path,
                                                                                 tmp_path: Path) -> None:
    """Tolerance 2e-5 absolute on every tensor after 4 AdamW steps at lr 3e-3: the two runs sum the same
    per-token losses in another order; Adam's normalisation turns rounding of near-zero gradients into
    differences of at most a few lr x 1e-3 (measured: 3.6e-6 max)."""
    data = samples(world, "image_instruct", 16)
    runs = {"batch4": config(steps=4, batch_size=4), "accum2x2": config(steps=4, batch_size=2, grad_accum=2),
            "batch2": config(steps=4, batch_size=2)}
    metrics = {}
    for name, settings in runs.items():
        model = build_model(llama_base, [tiny_spec("image")], strategy="decoupled", rank=2, alpha=4.0, seed=0)
        metrics[name] = train(model, data, world, settings, tmp_path / name, progress=False)
    assert metrics["accum2x2"]["global_batch"] == 4 and metrics["accum2x2"]["grad_accum"] == 2
    batch4, accum, batch2 = (saved_tensors(tmp_path / name) for name in runs)
    for key, value in batch4.items():
        torch.testing.assert_close(accum[key], value, rtol=0, atol=2e-5, msg=key)
    # The control: batches of two without accumulation take other steps.
    assert max((batch2[k] - v).abs().max().item() for k, v in batch4.items()) > 1e-3
    assert metrics["accum2x2"]["first_loss"] == pytest.approx(metrics["batch4"]["first_loss"], rel=1e-6)


def test_mixed_precision_trains_float32_weights_close_to_full_precision(llama_base: Path, world: Path,
                                                                        tmp_path: Path) -> None:
    precision = "bf16"
    data = samples(world, "image_instruct", 8)
    results = {}
    for name in ("no", precision):
        model = build_model(llama_base, [tiny_spec("image")], strategy="decoupled", rank=2, alpha=4.0, seed=0)
        results[name] = train(model, data, world, config(steps=2, mixed_precision=name), tmp_path / name,
                              progress=False)
    assert results[precision]["mixed_precision"] == precision
    assert results[precision]["first_loss"] != results["no"]["first_loss"]  # autocast did run
    assert results[precision]["first_loss"] == pytest.approx(results["no"]["first_loss"], rel=0.02)
    assert all(v.dtype == torch.float32 for v in saved_tensors(tmp_path / precision).values())


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 autocast exists on GPUs")
def test_fp16_without_a_gpu_is_refused(llama_base: Path, world: Path, tmp_path: Path) -> None:
    model = build_model(llama_base, [tiny_spec("image")], strategy="decoupled", rank=2, seed=0)
    with pytest.raises(MMComposeError, match="fp16 mixed precision needs a GPU"):
        train(model, samples(world, "image_instruct", 4), world, config(steps=1, mixed_precision="fp16"),
              tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_pretrained_encoder_is_frozen_in_eval_mode_and_left_out_of_step_checkpoints(
        llama_base: Path, world: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stage1 = build_model(llama_base, [tiny_spec("image")], strategy="connector-only", seed=0)
    train(stage1, samples(world, "image_caption", 4), world, config(stage="pretrain", steps=1), tmp_path / "s1",
          progress=False)
    encoder = {"image": tmp_path / "s1" / "model"}  # an encoder read from a checkpoint counts as pretrained
    data = samples(world, "image_instruct", 12)
    settings = config(steps=5, batch_size=2, grad_accum=2, save_every=2, seed=4)

    def fresh(seed: int):
        return build_model(llama_base, [tiny_spec("image")], strategy="decoupled", rank=2, alpha=4.0, seed=seed,
                           encoders=encoder)

    model = fresh(0)
    assert model.provenance["frozen_encoders"] == ["image"]
    modes = []
    forward = model.branches["image"].encoder.forward
    monkeypatch.setattr(model.branches["image"].encoder, "forward",
                        lambda x: (torch.is_grad_enabled() and modes.append(model.branches["image"].encoder.training),
                                   forward(x))[1])
    full = train(model, data, world, settings, tmp_path / "full", progress=False)
    monkeypatch.undo()
    assert modes and not any(modes) and full["trained_encoders"] == []
    before = load_file(tmp_path / "s1" / "model" / "model.safetensors")
    after = saved_tensors(tmp_path / "full")
    assert all(torch.equal(after[k], v) for k, v in before.items() if k.startswith("modalities.image.encoder."))

    interrupt_after(monkeypatch, 4)
    with pytest.raises(KeyboardInterrupt):
        train(fresh(0), data, world, settings, tmp_path / "cut", progress=False)
    monkeypatch.undo()
    saved = load_file(step_checkpoints(tmp_path / "cut")[-1] / TRAINED_TENSORS)
    assert saved and not any(k.startswith("modalities.image.encoder.") for k in saved)
    assert any(k.startswith("modalities.image.connector.") for k in saved)
    assert any(k.startswith("deltas.language.") for k in saved)
    assert not (step_checkpoints(tmp_path / "cut")[-1] / "model").exists()
    resumed = train(fresh(9), data, world, settings, tmp_path / "cut", resume=True, progress=False)
    assert resumed["resumed_from_step"] == 4
    expected, found = saved_tensors(tmp_path / "full"), saved_tensors(tmp_path / "cut")
    assert expected.keys() == found.keys() and all(torch.equal(expected[k], found[k]) for k in expected)


def test_encoder_width_that_does_not_fit_the_connector_is_refused_before_any_step(
        llama_base: Path, world: Path, tmp_path: Path) -> None:
    stage1 = build_model(llama_base, [tiny_spec("image")], strategy="connector-only", seed=0)
    train(stage1, samples(world, "image_caption", 4), world, config(stage="pretrain", steps=1), tmp_path / "s1",
          progress=False)
    wider = Component(type="image-patch", options=dict(image_size=16, patch_size=8, width=24, depth=1, heads=2))
    with pytest.raises(MMComposeError, match=r"encoder \(width 24\) does not match that checkpoint's connector"):
        build_model(llama_base, ["image"], strategy="decoupled", start_from=[tmp_path / "s1" / "model"],
                    encoders={"image": wider})


def test_a_run_that_fails_before_its_first_checkpoint_leaves_nothing(llama_base: Path, world: Path,
                                                                      tmp_path: Path) -> None:
    model = build_model(llama_base, [tiny_spec("image")], strategy="decoupled", rank=2, seed=0)
    with pytest.raises(MMComposeError, match="fewer than one global batch of 8"):
        train(model, samples(world, "image_instruct", 6), world, config(batch_size=4, grad_accum=2),
              tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_other_base_families_train_with_checkpointing_and_accumulation(family: str, world: Path,
                                                                       tmp_path: Path) -> None:
    from tests.conftest import make_base

    base = make_base(tmp_path / family, family)
    model = build_model(base, [tiny_spec("image")], strategy="decoupled", rank=2, alpha=4.0, seed=0)
    metrics = train(model, samples(world, "image_instruct", 8), world,
                    config(steps=2, batch_size=2, grad_accum=2, gradient_checkpointing=True), tmp_path / "run",
                    progress=False)
    assert metrics["steps"] == 2 and metrics["global_batch"] == 4
    assert any(k.startswith("deltas.image.") and v.abs().sum() > 0
               for k, v in saved_tensors(tmp_path / "run").items() if ".lora_B" in k)
