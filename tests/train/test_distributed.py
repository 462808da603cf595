"""Training under `accelerate launch`: DDP and FSDP2 with two processes on CPU over gloo reach the weights of a
one-process run with the same global batch; the shipped accelerate configs (DeepSpeed included) validate."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmcompose.checkpoint import load_checkpoint

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "accelerate"
# Two processes sum the same per-token losses as one process, in another order; after 4 AdamW steps at lr 1e-3
# the weights differ by float rounding only (measured: 1.7e-6 max for FSDP2 on a one-modality run).
TOLERANCE = 1e-5


def launch(config: Path | None, processes: int, arguments: list[str]) -> subprocess.CompletedProcess:
    accelerate = Path(sys.executable).with_name("accelerate")
    if processes == 1:
        command = [str(Path(sys.executable)), "-m", "mmcompose.cli", *arguments]
    else:
        command = [str(accelerate), "launch", "--config_file", str(config), "--num_processes", str(processes),
                   "-m", "mmcompose.cli", *arguments]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=environment, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def run_arguments(base: Path, world: Path, out: Path, batch_size: int, *extra: str) -> list[str]:
    return ["train", "modality", "--base", str(base), "--modality", "image,point", "--data-root", str(world),
            "--data", str(world / "data" / "image_instruct.json"),
            "--data", str(world / "data" / "point_instruct.json"),
            "--stage", "instruct", "--strategy", "decoupled", "--rank", "2", "--steps", "4",
            "--batch-size", str(batch_size), "--lr", "1e-3", "-o", str(out), *extra]


def assert_same_weights(one: Path, two: Path) -> None:
    expected, found = load_file(one / "model" / "model.safetensors"), load_file(two / "model" / "model.safetensors")
    assert expected.keys() == found.keys()
    for key, value in expected.items():
        torch.testing.assert_close(found[key], value, rtol=0, atol=TOLERANCE, msg=key)
    assert any(value.abs().sum() > 0 for key, value in found.items() if key.startswith("deltas.point.")
               and "lora_B" in key)


@pytest.fixture(scope="module")
def one_process(llama_base: Path, world: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("one-process") / "run"
    launch(None, 1, run_arguments(llama_base, world, out, 4))
    return out


@pytest.mark.slow
def test_two_process_ddp_reaches_the_one_process_weights(llama_base: Path, world: Path, tmp_path: Path,
                                                         one_process: Path) -> None:
    out = tmp_path / "ddp"
    result = launch(CONFIGS / "ddp.yaml", 2, run_arguments(llama_base, world, out, 2, "--save-every", "2"))
    assert result.stdout.count("trained image+point") == 1  # only the main process reports
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["processes"] == 2 and metrics["global_batch"] == 4 and metrics["distributed"] == "MULTI_CPU"
    model = load_checkpoint(out / "model")
    saved = load_file(out / "model" / "model.safetensors")
    assert all(torch.equal(value, saved[key]) for key, value in model.checkpoint_tensors().items())
    assert (out / "checkpoints" / "step-2" / "optimizer.safetensors").is_file()
    assert_same_weights(one_process, out)


@pytest.mark.slow
def test_two_process_fsdp2_reaches_the_one_process_weights(llama_base: Path, world: Path, tmp_path: Path,
                                                           one_process: Path) -> None:
    out = tmp_path / "fsdp"
    launch(CONFIGS / "fsdp.yaml", 2, run_arguments(llama_base, world, out, 2, "--gradient-checkpointing"))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["processes"] == 2 and metrics["global_batch"] == 4 and metrics["distributed"] == "FSDP"
    load_checkpoint(out / "model")
    assert_same_weights(one_process, out)


def load(name: str):
    from accelerate.commands.config.config_args import load_config_from_file

    return load_config_from_file(str(CONFIGS / name))


def test_ddp_and_fsdp_configs_load() -> None:
    from accelerate import FullyShardedDataParallelPlugin
    from accelerate.utils import DistributedType

    assert load("ddp.yaml").distributed_type == DistributedType.MULTI_GPU
    fsdp = load("fsdp.yaml")
    assert fsdp.distributed_type == DistributedType.FSDP
    options = fsdp.fsdp_config
    assert options["fsdp_version"] == 2 and options["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert options["fsdp_transformer_layer_cls_to_wrap"] == "LlamaDecoderLayer"
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy=options["fsdp_auto_wrap_policy"].lower(),
        transformer_cls_names_to_wrap=[options["fsdp_transformer_layer_cls_to_wrap"]],
        reshard_after_forward=options["fsdp_reshard_after_forward"], state_dict_type=options["fsdp_state_dict_type"])
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True


class _OneRank:
    """DeepSpeed's config validation asks a model-parallel unit for the data-parallel world size."""

    def get_data_parallel_world_size(self) -> int:
        return 1

    def get_data_parallel_rank(self) -> int:
        return 0

    def get_model_parallel_world_size(self) -> int:
        return 1

    def get_model_parallel_rank(self) -> int:
        return 0


@pytest.mark.parametrize(("name", "stage"), [("deepspeed_zero2.yaml", 2), ("deepspeed_zero3.yaml", 3)])
def test_deepspeed_configs_build_and_validate(name: str, stage: int) -> None:
    pytest.importorskip("deepspeed")
    from accelerate import DeepSpeedPlugin
    from accelerate.utils import DistributedType
    from deepspeed.runtime.config import DeepSpeedConfig

    loaded = load(name)
    assert loaded.distributed_type == DistributedType.DEEPSPEED and loaded.mixed_precision == "bf16"
    options = loaded.deepspeed_config
    plugin = DeepSpeedPlugin(zero_stage=options["zero_stage"], gradient_clipping=options["gradient_clipping"],
                             offload_optimizer_device=options["offload_optimizer_device"],
                             offload_param_device=options["offload_param_device"],
                             zero3_init_flag=options["zero3_init_flag"],
                             zero3_save_16bit_model=options.get("zero3_save_16bit_model", False),
                             gradient_accumulation_steps=4)
    plugin.set_mixed_precision(loaded.mixed_precision)
    config = copy.deepcopy(plugin.deepspeed_config)
    assert config["zero_optimization"]["stage"] == stage and config["bf16"] == {"enabled": True}
    # accelerate fills the "auto" batch sizes from the run; DeepSpeed then validates the whole config
    config.update(train_micro_batch_size_per_gpu=4, train_batch_size=16)
    validated = DeepSpeedConfig(config, mpu=_OneRank())
    assert validated.zero_optimization_stage == stage and validated.bfloat16_config.enabled
    assert validated.gradient_accumulation_steps == 4 and validated.gradient_clipping == 1.0
    if stage == 3:
        assert validated.zero_config.gather_16bit_weights_on_model_save
