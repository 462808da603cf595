"""The model layer: connectors, routed deltas, sequence assembly and the multimodal LLM."""

from mmcompose.model.assembly import Batch, Example
from mmcompose.model.mllm import ModalityBranch, MultimodalLLM, load_base, modality_spec
from mmcompose.model.routed import DEFAULT_TARGET_MODULES, TEXT_ROUTE, RouteContext, RoutedLinear
from mmcompose.model.spec import Component, DeltaSpec, ModalitySpec, ModelSpec, strategy_deltas

__all__ = [
    "DEFAULT_TARGET_MODULES",
    "TEXT_ROUTE",
    "Batch",
    "Component",
    "DeltaSpec",
    "Example",
    "ModalityBranch",
    "ModalitySpec",
    "ModelSpec",
    "MultimodalLLM",
    "RouteContext",
    "RoutedLinear",
    "load_base",
    "modality_spec",
    "strategy_deltas",
]
