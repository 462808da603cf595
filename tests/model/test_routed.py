"""The routed layer against a dense per-token reference `W x + D_route(x) x`."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from mmcompose.model.routed import DenseDelta, LoRADelta, RouteContext, RoutedLinear, difference


def _layer(route_to_delta: dict[int, str], seed: int = 0) -> tuple[RoutedLinear, RouteContext]:
    torch.manual_seed(seed)
    context = RouteContext(route_to_delta)
    layer = RoutedLinear(nn.Linear(12, 10, bias=True), context)
    for name in set(route_to_delta.values()):
        kind = "dense" if name.startswith("dense") else "lora"
        delta = layer.add_delta(name, kind, rank=3, alpha=6.0)
        with torch.no_grad():
            for parameter in delta.parameters():
                parameter.copy_(torch.randn_like(parameter))
    return layer, context


def _reference(layer: RoutedLinear, x: torch.Tensor, routes: torch.Tensor, route_to_delta: dict[int, str]):
    """Token by token, written independently of the layer's gather/scatter code."""
    out = torch.empty(*x.shape[:-1], layer.out_features)
    for index in np.ndindex(*x.shape[:-1]):
        token = x[index]
        y = layer.base.weight @ token + layer.base.bias
        name = route_to_delta.get(int(routes[index]))
        if name is not None:
            delta = layer.deltas[name]
            if isinstance(delta, LoRADelta):
                y = y + (delta.alpha / delta.rank) * (delta.lora_B @ (delta.lora_A @ token))
            else:
                y = y + delta.weight @ token
        out[index] = y
    return out


MAPPINGS = {
    "decoupled": {0: "language", 1: "image", 2: "audio"},
    "shared": {0: "shared", 1: "shared", 2: "shared"},
    "dense-and-missing": {0: "dense-language", 1: "image"},
}


@pytest.mark.parametrize("mapping", MAPPINGS.values(), ids=MAPPINGS.keys())
def test_routed_output_equals_per_token_reference(mapping: dict[int, str]) -> None:
    layer, context = _layer(mapping)
    x = torch.randn(3, 7, 12)
    routes = torch.randint(0, 3, (3, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), context.route(routes):
        got = layer(x)
    torch.testing.assert_close(got, _reference(layer, x, routes, mapping), rtol=1e-5, atol=1e-5)


def test_no_routes_means_every_token_is_text() -> None:
    mapping = MAPPINGS["decoupled"]
    layer, context = _layer(mapping)
    x = torch.randn(2, 4, 12)
    with torch.no_grad(), context.route(None):
        got = layer(x)
    expected = _reference(layer, x, torch.zeros(2, 4, dtype=torch.long), mapping)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_outside_a_route_block_only_the_base_runs() -> None:
    layer, _ = _layer(MAPPINGS["decoupled"])
    x = torch.randn(2, 4, 12)
    torch.testing.assert_close(layer(x), layer.base(x))


def test_gradients_reach_only_the_deltas_of_present_routes() -> None:
    layer, context = _layer(MAPPINGS["decoupled"])
    x = torch.randn(2, 5, 12)
    routes = torch.tensor([[0, 0, 1, 1, 0], [0, 1, 1, 0, 0]])
    with context.route(routes):
        layer(x).sum().backward()
    assert layer.deltas["language"].lora_A.grad.abs().sum() > 0
    assert layer.deltas["image"].lora_A.grad.abs().sum() > 0
    assert layer.deltas["audio"].lora_A.grad is None


@pytest.mark.parametrize("mapping", MAPPINGS.values(), ids=MAPPINGS.keys())
def test_fold_matches_unfolded_and_unfold_is_exact(mapping: dict[int, str]) -> None:
    layer, context = _layer(mapping)
    original = layer.base.weight.detach().clone()
    x = torch.randn(3, 7, 12)
    routes = torch.randint(0, 3, (3, 7), generator=torch.Generator().manual_seed(2))
    expected = _reference(layer, x, routes, mapping)
    text = mapping.get(0)
    corrections = {r: name for r, name in mapping.items() if r != 0 and name != text}
    corrections.update({r: "__base__" for r in (1, 2) if r not in mapping and text is not None})
    layer.fold(text, set(corrections.values()))
    context.folded, context.folded_route_to_delta = True, corrections
    with torch.no_grad(), context.route(routes):
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    layer.unfold()
    context.folded = False
    assert torch.equal(layer.base.weight, original)


def test_difference_is_low_rank_when_both_are_lora() -> None:
    torch.manual_seed(0)
    a, b = LoRADelta(6, 5, 2, 4.0), LoRADelta(6, 5, 3, 3.0)
    for delta in (a, b):
        torch.nn.init.normal_(delta.lora_B)
    result = difference(a, b)
    assert isinstance(result, LoRADelta) and result.rank == 5
    torch.testing.assert_close(result.matrix(), a.matrix() - b.matrix())
    dense = DenseDelta(6, 5)
    torch.nn.init.normal_(dense.weight)
    torch.testing.assert_close(difference(dense, b).matrix(), dense.weight - b.matrix())
    torch.testing.assert_close(difference(None, b).matrix(), -b.matrix())
