"""The composition config (YAML), mergekit's habits where they fit, validated with one-line errors.
Model paths are relative to the working directory, as in mergekit.

    method: damc                 # naive | damc
    merge: ties                  # linear | ties | dare_linear | dare_ties | magnitude_prune | factorwise_mean
    parameters: {density: 0.5}   # the merge operator's global parameters
    seed: 0                      # for the random operators (DARE)
    models:
      - path: runs/image
        lambda: 0.3              # default 1/M; in DAMC it weighs the language delta only
        density: 0.7             # per-model operator parameter, overrides the global one
      - path: runs/image-other
        rename: {image: sketch}  # two inputs may not claim one modality unless one is renamed
    lambdas: {audio: 0.2}        # alternatively, lambdas by model name (a model's name defaults to its modalities)
    # or as the official merge script takes them (vision = our image):
    # lambdas: default-video=0.333,default-audio=0.333,default-vision=0.333
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from mmcompose.compose.operators import OPERATORS, validate_parameters
from mmcompose.errors import CompositionError

LEGACY_MERGE = "factorwise_mean"


class ModelEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    path: Path
    name: str | None = None
    lambda_: float | None = Field(None, alias="lambda")
    density: float | None = None
    rename: dict[str, str] = Field(default_factory=dict)


class CompositionConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    method: Literal["naive", "damc"]
    merge: str = "linear"
    models: list[ModelEntry] = Field(min_length=1)
    parameters: dict[str, Any] = Field(default_factory=dict)
    lambdas: dict[str, float] = Field(default_factory=dict)
    seed: int = 0

    @field_validator("lambdas", mode="before")
    @classmethod
    def _official_lambdas(cls, lambdas: Any) -> Any:
        return parse_official_lambdas(lambdas) if isinstance(lambdas, str) else lambdas

    @field_validator("merge")
    @classmethod
    def _known_merge(cls, merge: str) -> str:
        if merge != LEGACY_MERGE and merge not in OPERATORS:
            raise ValueError(f"unknown merge {merge!r}; known: {', '.join([*sorted(OPERATORS), LEGACY_MERGE])}")
        return merge


OFFICIAL_MODALITY_NAMES = {"vision": "image"}


def parse_official_lambdas(text: str) -> dict[str, float]:
    """`default-video=0.333,default-audio=0.333,default-vision=0.333` (the official merge script's coefficients
    for each model's language delta, after its `online-merge-reset-` prefix) -> `{video: 0.333, audio: 0.333,
    image: 0.333}`, keyed by the names imported single-modality models get (official `vision` is `image`)."""
    lambdas: dict[str, float] = {}
    for item in text.removeprefix("online-merge-reset-").split(","):
        key, sep, value = item.strip().partition("=")
        if not sep or not key.startswith("default-"):
            raise ValueError(f"expected default-<modality>=<lambda>, got {item.strip()!r}")
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"{key}: {value!r} is not a number") from None
        modality = key.removeprefix("default-")
        lambdas[OFFICIAL_MODALITY_NAMES.get(modality, modality)] = number
    return lambdas


def parse_config(raw: dict[str, Any], origin: str = "config") -> CompositionConfig:
    """Validate a config mapping; every problem is one line naming the key."""
    if not isinstance(raw, dict):
        raise CompositionError(f"{origin}: expected a mapping with method, merge and models")
    try:
        config = CompositionConfig.model_validate(raw)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "config"
        message = "unknown key" if first["type"] == "extra_forbidden" else first["msg"]
        raise CompositionError(f"{origin}: {where}: {message}") from None
    if config.merge != LEGACY_MERGE:
        params = dict(config.parameters)
        if any(entry.density is not None for entry in config.models):
            params["density"] = [entry.density if entry.density is not None else config.parameters.get("density")
                                 for entry in config.models]
        try:
            validate_parameters(config.merge, params)
        except CompositionError as error:
            raise CompositionError(f"{origin}: {error}") from None
    elif config.parameters or any(entry.density is not None for entry in config.models):
        raise CompositionError(f"{origin}: merge {LEGACY_MERGE!r} takes no parameters")
    return config


def load_config(path: str | Path) -> CompositionConfig:
    path = Path(path)
    if not path.is_file():
        raise CompositionError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise CompositionError(f"{path}: invalid YAML{where}") from None
    return parse_config(raw, str(path))
