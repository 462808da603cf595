"""The flags of ModelCompose's released training scripts (`scripts/model_composition/train/*.sh`), transcribed by
hand, and the defaults of `modelcompose/train/train_multimodal.py` that those scripts leave in force.

Only flags that decide what trains and how are kept (paths, logging, saving and evaluation flags are left out).
Point scripts look swapped by name: `run_finetune_point_naive_mc.sh` is the one with `modal+language`.
"""

from __future__ import annotations

from typing import Any

COMMON = {"weight_decay": 0.0, "warmup_ratio": 0.03, "lr_scheduler_type": "cosine", "bf16": True,
          "model_max_length": 2048, "gradient_checkpointing": True, "dataloader_num_workers": 4}
DEFAULTS = {"lora_dropout": 0.05, "local_prefix_tokens": 0, "local_suffix_tokens": 0, "group_by_length": False,
            "image_aspect_ratio": "square"}
LORA = {"lora_r": 128, "lora_alpha": 256, "mm_projector_lr": 2e-5}

SCRIPTS: dict[str, dict[str, Any]] = {
    "run_pretrain_vision.sh": {
        "deepspeed": "zero2", "version": "plain", "projector_type": "mlp2x_gelu", "tune_mm_mlp_adapter": True,
        "num_train_epochs": 1, "per_device_train_batch_size": 32, "gradient_accumulation_steps": 1,
        "learning_rate": 1e-3},
    "run_pretrain_audio.sh": {
        "deepspeed": "zero2", "version": "plain", "projector_type": "qformer_32N_2L", "tune_mm_mlp_adapter": True,
        "num_train_epochs": 1, "per_device_train_batch_size": 16, "gradient_accumulation_steps": 1,
        "learning_rate": 1e-4},
    "run_pretrain_point.sh": {
        "deepspeed": "zero3", "version": "v1", "projector_type": "mlp2x_gelu", "tune_mm_mlp_adapter": True,
        "num_train_epochs": 3, "per_device_train_batch_size": 16, "gradient_accumulation_steps": 1,
        "learning_rate": 2e-3},
    "run_finetune_vision_damc.sh": {
        **LORA, "lora_strategy": "modal+language", "mm_language_lr": 1e-5, "local_prefix_tokens": 5,
        "local_suffix_tokens": 5, "deepspeed": "zero3", "version": "v1", "projector_type": "mlp2x_gelu",
        "image_aspect_ratio": "pad", "num_train_epochs": 1, "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 4, "learning_rate": 2e-4},
    "run_finetune_vision_naive_mc.sh": {
        **LORA, "lora_strategy": "same", "deepspeed": "zero3", "version": "v1", "projector_type": "mlp2x_gelu",
        "image_aspect_ratio": "pad", "num_train_epochs": 1, "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 4, "learning_rate": 2e-4},
    "run_finetune_audio_damc.sh": {
        **LORA, "lora_strategy": "modal+language", "mm_language_lr": 1e-5, "local_prefix_tokens": 5,
        "local_suffix_tokens": 5, "deepspeed": "zero2", "version": "v1", "projector_type": "qformer_32N_2L",
        "num_train_epochs": 1, "per_device_train_batch_size": 8, "gradient_accumulation_steps": 2,
        "learning_rate": 1e-5},
    "run_finetune_audio_naive_mc.sh": {
        **LORA, "lora_strategy": "same", "deepspeed": "zero2", "version": "v1", "projector_type": "qformer_32N_2L",
        "num_train_epochs": 1, "per_device_train_batch_size": 8, "gradient_accumulation_steps": 2,
        "learning_rate": 2e-5},
    "run_finetune_video_damc.sh": {
        **LORA, "lora_strategy": "modal+language", "local_prefix_tokens": 5, "local_suffix_tokens": 5,
        "deepspeed": "zero3", "version": "v1", "projector_type": "mlp2x_gelu", "image_aspect_ratio": "pad",
        "group_by_length": True, "num_train_epochs": 1, "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 4, "learning_rate": 2e-4},
    "run_finetune_video_naive_mc.sh": {
        **LORA, "lora_strategy": "same", "deepspeed": "zero3", "version": "v1", "projector_type": "mlp2x_gelu",
        "image_aspect_ratio": "pad", "group_by_length": True, "num_train_epochs": 1,
        "per_device_train_batch_size": 4, "gradient_accumulation_steps": 4, "learning_rate": 2e-4},
    "run_finetune_point_naive_mc.sh": {
        **LORA, "lora_strategy": "modal+language", "local_prefix_tokens": 5, "local_suffix_tokens": 5,
        "deepspeed": "zero3", "version": "v1", "projector_type": "mlp2x_gelu", "num_train_epochs": 3,
        "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1, "learning_rate": 2e-5},
    "run_finetune_point_damc.sh": {
        **LORA, "lora_strategy": "same", "deepspeed": "zero3", "version": "v1", "projector_type": "mlp2x_gelu",
        "num_train_epochs": 3, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1,
        "learning_rate": 2e-5},
}

RECIPE_SCRIPTS = {
    "image-stage1": "run_pretrain_vision.sh", "audio-stage1": "run_pretrain_audio.sh",
    "point-stage1": "run_pretrain_point.sh",
    "image-stage2-decoupled": "run_finetune_vision_damc.sh", "image-stage2-shared": "run_finetune_vision_naive_mc.sh",
    "audio-stage2-decoupled": "run_finetune_audio_damc.sh", "audio-stage2-shared": "run_finetune_audio_naive_mc.sh",
    "video-stage2-decoupled": "run_finetune_video_damc.sh", "video-stage2-shared": "run_finetune_video_naive_mc.sh",
    "point-stage2-decoupled": "run_finetune_point_naive_mc.sh", "point-stage2-shared": "run_finetune_point_damc.sh",
}
"""Recipe -> the script it reproduces. `video-stage1` has none: the released video model starts from
Video-LLaVA-Pretrain-7B's projector."""


def flags(script: str) -> dict[str, Any]:
    """A script's flags with the defaults it leaves in force."""
    return {**DEFAULTS, **COMMON, **SCRIPTS[script]}


def trained_groups(script: str) -> dict[str, float]:
    """What `llava_trainer.py` trains and at which rate, by role: with `tune_mm_mlp_adapter` only the projector
    (at `learning_rate`); otherwise the main group at `learning_rate` (the LoRA adapters, and the boundary
    tokens when there are any) and the projector's group at `mm_projector_lr`, which also takes the language
    adapter (`lora_A/B.default`) when `mm_language_lr` is passed (that value is never read)."""
    given = flags(script)
    if given.get("tune_mm_mlp_adapter"):
        return {"connector": given["learning_rate"]}
    main, projector = given["learning_rate"], given["mm_projector_lr"]
    groups = {"connector": projector}
    if given["lora_strategy"] == "same":
        return {**groups, "deltas": main}
    groups |= {"deltas": main, "language": projector if "mm_language_lr" in given else main}
    return groups | ({"boundary": main} if given["local_prefix_tokens"] else {})
