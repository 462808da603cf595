"""What a multimodal LLM is made of, as data: the part of a checkpoint manifest that rebuilds the model."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from mmcompose.model.conversation import CHAT
from mmcompose.model.routed import DEFAULT_TARGET_MODULES

Strategy = Literal["connector-only", "shared", "decoupled", "full", "composed"]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Component(Strict):
    """A registered type name and the options that rebuild it."""

    type: str
    options: dict[str, Any] = Field(default_factory=dict)


NAME = r"^[A-Za-z0-9_-]+$"  # names become tensor-name components (`deltas.<name>.<module>`): no dots


class ModalitySpec(Strict):
    name: str = Field(pattern=NAME)
    placeholder: str
    processor: Component
    encoder: Component
    connector: Component
    num_prefix_tokens: int = Field(0, ge=0)
    num_suffix_tokens: int = Field(0, ge=0)


class DeltaSpec(Strict):
    """One delta on every target linear; `routes` are the route names it serves ("text" or a modality)."""

    name: str = Field(pattern=NAME)
    kind: Literal["lora", "dense"]
    routes: list[str]
    rank: int | None = Field(None, gt=0)
    alpha: float | None = None
    source: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _lora_needs_rank(self) -> DeltaSpec:
        if self.kind == "lora" and (self.rank is None or self.alpha is None):
            raise ValueError(f"LoRA delta {self.name!r} needs rank and alpha")
        return self


class ModelSpec(Strict):
    modalities: list[ModalitySpec]
    deltas: list[DeltaSpec] = Field(default_factory=list)
    target_modules: list[str] = Field(default_factory=lambda: list(DEFAULT_TARGET_MODULES))
    template: str = "tagged"
    chat_template: str | None = None  # the Jinja text of template "chat", recorded so inference renders as training
    strategy: Strategy = "connector-only"

    @model_validator(mode="after")
    def _consistent(self) -> ModelSpec:
        if (self.template == CHAT) != (self.chat_template is not None):
            raise ValueError(f"template {CHAT!r} needs its chat_template text, and only it has one")
        names = [m.name for m in self.modalities]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate modality names in {names}")
        placeholders = [m.placeholder for m in self.modalities]
        if len(set(placeholders)) != len(placeholders):
            raise ValueError(f"duplicate placeholders in {placeholders}")
        served: dict[str, str] = {}
        for delta in self.deltas:
            for route in delta.routes:
                if route != "text" and route not in names:
                    raise ValueError(f"delta {delta.name!r} serves unknown route {route!r}")
                if route in served:
                    raise ValueError(f"route {route!r} is served by both {served[route]!r} and {delta.name!r}")
                served[route] = delta.name
        if len({d.name for d in self.deltas}) != len(self.deltas):
            raise ValueError("duplicate delta names")
        return self

    def route_ids(self) -> dict[str, int]:
        """Route ids: text is 0, modality i (in manifest order) is i + 1."""
        return {"text": 0, **{m.name: i + 1 for i, m in enumerate(self.modalities)}}


def strategy_deltas(strategy: Strategy, modalities: list[str], rank: int = 16, alpha: float = 32.0) -> list[DeltaSpec]:
    """The deltas a single-modality (or joint) training strategy creates."""
    if strategy == "connector-only":
        return []
    if strategy == "shared":
        return [DeltaSpec(name="shared", kind="lora", routes=["text", *modalities], rank=rank, alpha=alpha)]
    if strategy == "decoupled":
        return [DeltaSpec(name="language", kind="lora", routes=["text"], rank=rank, alpha=alpha)] + [
            DeltaSpec(name=m, kind="lora", routes=[m], rank=rank, alpha=alpha) for m in modalities
        ]
    if strategy == "full":
        return [DeltaSpec(name="full", kind="dense", routes=["text", *modalities])]
    raise ValueError(f"strategy {strategy!r} is not a training strategy")
