"""Training recipes: one YAML file with the model to build and the `TrainConfig` to train it with.

A recipe fixes what a published training run fixed (modalities, strategy, LoRA rank and alpha, target modules,
boundary tokens, encoder, connector, template, and every optimisation setting) and leaves the machine-specific
parts (base LLM directory, data files, output directory, stage-1 checkpoint) to the command line, which can
also override any field:

    model:     {modalities: [image], strategy: decoupled, rank: 128, alpha: 256, target_modules: [...],
                boundary_tokens: 5, encoder: {image: PATH-OR-NAME}, connector: mlp2x_gelu, template: vicuna_v1,
                image_aspect_ratio: pad}
    train:     TrainConfig fields (stage, batch_size, grad_accum, lr, ...)
    launch:    the command that runs it (documentation)
    gpu_memory: an estimate and how it was made (documentation)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from mmcompose.model.spec import Strategy
from mmcompose.train.trainer import TrainConfig, read_yaml_mapping, validated


class RecipeModel(BaseModel):
    """The model a recipe builds (see `trainer.build_model`)."""

    model_config = ConfigDict(extra="forbid")
    modalities: list[str] = Field(min_length=1)
    strategy: Strategy | None = Field(None, description="default: connector-only for the pretrain stage")
    rank: int = Field(16, gt=0)
    alpha: float | None = Field(None, description="default: 2 x rank")
    target_modules: list[str] | None = None
    boundary_tokens: int | None = Field(None, ge=0, description="prefix and suffix tokens each")
    encoder: dict[str, str] = Field(default_factory=dict, description="modality -> encoder source")
    connector: str | None = Field(None, description="a registered connector (NAME or NAME:{json options})")
    template: str | None = None
    image_aspect_ratio: Literal["square", "pad"] | None = Field(
        None, description="pad: images are padded to a square of the processor's mean colour before resizing "
                          "(LLaVA-1.5's and ModelCompose's image_aspect_ratio pad); None: the start checkpoint's")

    def processor_options(self) -> dict[str, dict[str, Any]]:
        """Options this recipe puts on the modalities' processors."""
        if self.image_aspect_ratio is None or "image" not in self.modalities:
            return {}
        return {"image": {"pad_to_square": self.image_aspect_ratio == "pad"}}


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid")
    description: str = ""
    launch: str = ""
    gpu_memory: str = ""
    model: RecipeModel
    train: TrainConfig


def load_recipe(path: str | Path) -> Recipe:
    """A recipe from YAML, validated; every problem is one line naming the file and the field."""
    return validated(Recipe, read_yaml_mapping(path, "recipe"), str(path))


def with_overrides(recipe: Recipe, model: dict[str, Any], train: dict[str, Any]) -> Recipe:
    """The recipe with command-line values (None: not given) on top, validated again."""
    merged = recipe.model_dump()
    for key, value in model.items():
        if value is None:
            continue
        merged["model"][key] = {**merged["model"][key], **value} if key == "encoder" else value
    for key, value in train.items():
        if value is None:
            continue
        if isinstance(value, dict) and isinstance(merged["train"].get(key), dict):
            merged["train"][key] = {**merged["train"][key], **value}
        else:
            merged["train"][key] = value
    return validated(Recipe, merged, None)
