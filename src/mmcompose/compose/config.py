"""The composition config and the LLM merge config (YAML), mergekit's habits where they fit, validated with
one-line errors. Model paths are relative to the working directory, as in mergekit.

Composition (`mmcompose compose`):

    method: damc                 # naive | damc
    merge: ties                  # linear | ties | dare_linear | dare_ties | magnitude_prune | factorwise_mean
    parameters: {density: 0.5}   # the merge method's global parameters
    seed: 0                      # for the random methods (DARE)
    models:
      - path: runs/image
        lambda: 0.3              # default 1/M; in DAMC it weighs the language delta only
        density: 0.7             # per-model parameter, overrides the global one
      - path: runs/image-other
        rename: {image: sketch}  # two inputs may not claim one modality unless one is renamed
    lambdas: {audio: 0.2}        # alternatively, lambdas by model name (a model's name defaults to its modalities)
    # or as the official merge script takes them (vision = our image):
    # lambdas: default-video=0.333,default-audio=0.333,default-vision=0.333

Merging full fine-tunes of one LLM (`mmcompose merge`):

    base: models/base-llm        # a transformers directory with safetensors weights
    merge: ties                  # any method but factorwise_mean, which needs LoRA inputs
    parameters: {density: 0.5}
    seed: 0
    models:
      - path: models/llm-math
        lambda: 0.5
        density: 0.7
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from mmcompose.compose.operators import METHODS, validate_parameters
from mmcompose.errors import CompositionError

LEGACY_MERGE = "factorwise_mean"


class WeightedModel(BaseModel):
    """One input of a merge: where it is, its weight and its own density."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    path: Path
    lambda_: float | None = Field(None, alias="lambda")
    density: float | None = None


class ModelEntry(WeightedModel):
    name: str | None = None
    rename: dict[str, str] = Field(default_factory=dict)


class MergeSpec(BaseModel):
    """What every merge config says: `merge` (the method), its global `parameters`, the `seed` of the random
    methods. The fields are declared by each config, in the order its YAML lists them and its provenance records
    them; this base checks them and assembles the method's parameters."""

    model_config = ConfigDict(extra="forbid")

    @field_validator("merge", check_fields=False)
    @classmethod
    def _known_merge(cls, merge: str) -> str:
        if merge not in METHODS:
            raise ValueError(f"unknown merge {merge!r}; known: {', '.join(sorted(METHODS))}")
        return merge

    def method_parameters(self, densities: list[float | None]) -> dict[str, Any]:
        """The method's parameters for inputs with these per-input densities (None: the global one)."""
        parameters: dict[str, Any] = getattr(self, "parameters")  # noqa: B009 (declared by each config)
        params = dict(parameters)
        if any(density is not None for density in densities):
            params["density"] = [parameters.get("density") if d is None else d for d in densities]
        return params


class CompositionConfig(MergeSpec):
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


class LLMMergeConfig(MergeSpec):
    """Full fine-tunes of `base` (plain transformers directories) to merge into one LLM."""

    base: Path
    merge: str = "linear"
    parameters: dict[str, Any] = Field(default_factory=dict)
    seed: int = 0
    models: list[WeightedModel] = Field(min_length=1)

    @field_validator("merge")
    @classmethod
    def _merges_deltas(cls, merge: str) -> str:
        if merge in METHODS and METHODS[merge].space == "factors":
            raise ValueError(f"merge {merge!r} needs LoRA inputs; full fine-tunes take "
                             f"{', '.join(sorted(n for n, m in METHODS.items() if m.space == 'deltas'))}")
        return merge

    def lambdas(self) -> list[float]:
        """One weight per model, 1/M where none is given."""
        return [1.0 / len(self.models) if entry.lambda_ is None else entry.lambda_ for entry in self.models]

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


Config = TypeVar("Config", bound=MergeSpec)


def _validate(schema: type[Config], raw: Any, origin: str) -> Config:
    """Validate a config mapping; every problem is one line naming the key."""
    if not isinstance(raw, dict):
        raise CompositionError(f"{origin}: expected a mapping with merge and models")
    try:
        config = schema.model_validate(raw)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "config"
        message = "unknown key" if first["type"] == "extra_forbidden" else first["msg"]
        raise CompositionError(f"{origin}: {where}: {message}") from None
    params = config.method_parameters([entry.density for entry in getattr(config, "models")])  # noqa: B009
    try:
        validate_parameters(config.merge, params)
    except CompositionError as error:
        raise CompositionError(f"{origin}: {error}") from None
    return config


def parse_config(raw: dict[str, Any], origin: str = "config") -> CompositionConfig:
    """Validate a composition config mapping; every problem is one line naming the key."""
    return _validate(CompositionConfig, raw, origin)


def parse_merge_config(raw: dict[str, Any], origin: str = "config") -> LLMMergeConfig:
    """Validate an LLM merge config mapping; every problem is one line naming the key."""
    return _validate(LLMMergeConfig, raw, origin)


def _read_yaml(path: str | Path) -> tuple[Any, str]:
    path = Path(path)
    if not path.is_file():
        raise CompositionError(f"{path}: config file not found")
    try:
        return yaml.safe_load(path.read_text()), str(path)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise CompositionError(f"{path}: invalid YAML{where}") from None


def load_config(path: str | Path) -> CompositionConfig:
    return parse_config(*_read_yaml(path))


def load_merge_config(path: str | Path) -> LLMMergeConfig:
    return parse_merge_config(*_read_yaml(path))
