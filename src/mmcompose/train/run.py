"""`mmcompose train modality`: a recipe or flags -> model -> training run (the logic behind the CLI command)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer

from mmcompose.data.dataset import load_training_samples
from mmcompose.errors import MMComposeError
from mmcompose.files import read_json
from mmcompose.importers.encoders import named_component, parse_encoder_option
from mmcompose.modalities import CONNECTORS
from mmcompose.model.conversation import CHAT, TEMPLATE_NAMES
from mmcompose.model.mllm import MultimodalLLM
from mmcompose.model.spec import Component
from mmcompose.train.recipe import Recipe, RecipeModel, load_recipe, with_overrides
from mmcompose.train.trainer import TrainConfig, build_model, describe_groups, parameter_groups, train

STRATEGIES = ("connector-only", "shared", "decoupled", "full")


def parse_connector(text: str) -> Component:
    """`NAME` or `NAME:{json options}` of a registered connector."""
    if text.partition(":")[0] not in CONNECTORS:
        raise MMComposeError(f"--connector {text!r}: unknown connector; registered: {', '.join(sorted(CONNECTORS))}")
    return named_component(text, f"--connector {text!r}")


def default_template(base: Path) -> str:
    """`vicuna_v1` for a Vicuna base (by directory name or recorded `_name_or_path`: Vicuna's tokenizer has no
    chat template, and ModelCompose trained on it with this layout), else `chat` where the base tokenizer has a
    chat template of its own (a Qwen2 or Mistral base), `tagged` otherwise."""
    config = read_json(base / "config.json") if (base / "config.json").is_file() else {}
    names = f"{base.name} {config.get('_name_or_path', '')}".lower()
    if "vicuna" in names:
        return "vicuna_v1"
    if not (base / "config.json").is_file():
        return "tagged"  # not a base directory: loading the model reports that
    tokenizer = AutoTokenizer.from_pretrained(base, local_files_only=True)
    return CHAT if getattr(tokenizer, "chat_template", None) else "tagged"


def resolve_run(recipe_path: Path | None, config_path: Path | None, model: dict[str, Any],
                train_values: dict[str, Any], data_values: dict[str, Any]) -> Recipe:
    """The run's recipe: `--recipe` (or a bare `TrainConfig` YAML via `--config`) with the flags on top
    (`data_values`: the `TrainConfig.data` options)."""
    if recipe_path is not None and config_path is not None:
        raise MMComposeError("give --recipe or --config, not both")
    if recipe_path is not None:
        run = with_overrides(load_recipe(recipe_path), model, train_values)
        return run.model_copy(update={"train": run.train.model_copy(
            update={"data": run.train.data.updated(**data_values)})})
    from mmcompose.train.trainer import load_config

    settings = load_config(config_path, **train_values)
    settings = settings.model_copy(update={"data": settings.data.updated(**data_values)})
    if not model.get("modalities"):
        raise MMComposeError("--modality is required (here or in a --recipe)")
    try:
        described = RecipeModel.model_validate({k: v for k, v in model.items() if v is not None})
    except ValueError as error:
        raise MMComposeError(f"model settings: {' '.join(str(error).split())}") from None
    return Recipe(model=described, train=settings)


def build_run_model(base: Path, recipe: Recipe, start_from: Sequence[Path]) -> MultimodalLLM:
    """The recipe's model on `base`, its branches from `start_from`, ready to train."""
    described, settings = recipe.model, recipe.train
    strategy = described.strategy or ("connector-only" if settings.stage == "pretrain" else None)
    if strategy is None:
        raise MMComposeError("--strategy is required for the instruct stage")
    if strategy not in STRATEGIES:
        raise MMComposeError(f"--strategy {strategy!r}: choose {', '.join(STRATEGIES)}")
    if described.template is not None and described.template not in TEMPLATE_NAMES:
        raise MMComposeError(f"--template {described.template!r}: known templates: {', '.join(TEMPLATE_NAMES)}")
    encoders = dict(parse_encoder_option(f"{m}={spec}") for m, spec in described.encoder.items())
    return build_model(
        base, described.modalities, strategy=strategy, rank=described.rank,
        alpha=2.0 * described.rank if described.alpha is None else described.alpha, start_from=start_from,
        seed=settings.seed, template=described.template or (None if start_from else default_template(base)),
        encoders=encoders, connector=parse_connector(described.connector) if described.connector else None,
        boundary_tokens=described.boundary_tokens, target_modules=described.target_modules,
        processor_options=described.processor_options())


def run_modality_training(*, base: Path, data: Sequence[Path], data_root: Path, out: Path, recipe: Recipe,
                          start_from: Sequence[Path], resume: bool) -> dict[str, Any]:
    """Build the recipe's model on `base` (branches from `start_from`) and train it on `data`."""
    model = build_run_model(base, recipe, start_from)
    loaded = load_training_samples(data, data_root, model, recipe.train.data.on_bad_sample)
    return train(model, loaded.samples, data_root, recipe.train, out, resume=resume, skipped=loaded.skipped)


def trained_groups(base: Path, recipe: Recipe, start_from: Sequence[Path]) -> dict[str, dict[str, Any]]:
    """What a run of `recipe` would train, without training: each parameter group's peak learning rate and
    parameter count (`train --dry-run`; a finished run records the same in its metrics)."""
    model = build_run_model(base, recipe, start_from)
    return describe_groups(parameter_groups(model, recipe.train))


def model_overrides(modality: str | None, strategy: str | None, rank: int | None, alpha: float | None,
                    encoder: Sequence[str], connector: str | None, boundary_tokens: int | None,
                    template: str | None) -> dict[str, Any]:
    """Command-line model settings as recipe fields (None: not given)."""
    names = [name.strip() for name in modality.split(",") if name.strip()] if modality else None
    encoders = {}
    for item in encoder:
        name, separator, spec = item.partition("=")
        if not separator or not name.strip() or not spec.strip():
            raise MMComposeError(f"--encoder expects MODALITY=SPEC, got {item!r}")
        encoders[name.strip()] = spec.strip()
    return {"modalities": names, "strategy": strategy, "rank": rank, "alpha": alpha, "encoder": encoders or None,
            "connector": connector, "boundary_tokens": boundary_tokens, "template": template}


__all__ = ["TrainConfig", "build_run_model", "default_template", "model_overrides", "parse_connector", "resolve_run",
           "run_modality_training", "trained_groups"]
