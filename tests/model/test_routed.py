"""The routed layer against a dense per-token reference `W x + D_route(x) x`."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
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
    "text-delta-only": {0: "language"},
    "non-adjacent": {0: "language", 1: "image", 2: "audio", 3: "image"},
}


def _routes(kind: str, seed: int = 1) -> torch.Tensor:
    """`scattered`: random routes (many short runs); `prompts`: each modality's tokens in stretches, as assembled
    prompts have them; `one-each`: one stretch per route (the in-place runs form at inference)."""
    if kind == "scattered":
        return torch.randint(0, 4, (3, 7), generator=torch.Generator().manual_seed(seed))
    if kind == "one-each":
        return torch.tensor([[0, 1, 1, 1, 0, 0, 0], [0, 0, 2, 2, 2, 2, 0], [0, 0, 0, 3, 3, 0, 0]])
    return torch.tensor([[0, 1, 1, 1, 0, 2, 2], [0, 0, 3, 3, 0, 0, 0], [2, 2, 2, 0, 1, 1, 0]])


def _forward(layer: RoutedLinear, x: torch.Tensor, training: bool) -> torch.Tensor:
    """Inference (no grad: runs added in place) or training (grad: gather, then one scatter)."""
    with torch.set_grad_enabled(training):
        return layer(x).detach()


@pytest.mark.parametrize("training", [False, True], ids=["inference", "training"])
@pytest.mark.parametrize("kind", ["scattered", "prompts", "one-each"])
@pytest.mark.parametrize("mapping", MAPPINGS.values(), ids=MAPPINGS.keys())
def test_routed_output_equals_per_token_reference(mapping: dict[int, str], kind: str, training: bool) -> None:
    layer, context = _layer(mapping)
    x = torch.randn(3, 7, 12)
    routes = _routes(kind)
    with context.route(routes):
        got = _forward(layer, x, training)
    torch.testing.assert_close(got, _reference(layer, x, routes, mapping), rtol=1e-5, atol=1e-5)


def test_one_run_per_route_is_added_in_place_else_one_gather() -> None:
    context = RouteContext(MAPPINGS["decoupled"])
    context.folded = True
    image, audio, minus_text = ("image", 1), ("audio", 1), ("language", -1)
    with context.route(torch.tensor([[0, 1, 1, 1, 0, 2, 2, 0, 3, 0]])):
        assert [(run.start, run.stop, run.needs) for run in context.plan.runs] == [
            (1, 4, (image, minus_text)), (5, 7, (audio, minus_text)), (8, 9, (minus_text,))]
    with context.route(_routes("prompts")):  # two runs of image and of audio
        assert context.plan.runs is None and context.plan.rows.numel() == 12
    with context.route(torch.arange(40).remainder(3).reshape(4, 10)):
        assert context.plan.runs is None and context.plan.rows.numel() == 26  # the 14 text tokens need nothing


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


def _tensor_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


@pytest.mark.parametrize("kind", ["scattered", "prompts", "one-each"])
@pytest.mark.parametrize("mapping", MAPPINGS.values(), ids=MAPPINGS.keys())
def test_fold_matches_unfolded_and_unfold_is_exact(mapping: dict[int, str], kind: str) -> None:
    layer, context = _layer(mapping)
    original = layer.base.weight.detach().clone()
    held = _tensor_bytes(layer)
    x = torch.randn(3, 7, 12)
    routes = _routes(kind, seed=2)
    expected = _reference(layer, x, routes, mapping)
    text_only = _reference(layer, x, torch.zeros(3, 7, dtype=torch.long), mapping)
    if 0 in mapping:
        layer.fold(mapping[0])
    context.folded = True
    assert _tensor_bytes(layer) == held and not any(isinstance(v, torch.Tensor) for v in vars(layer).values())
    with torch.no_grad():
        with context.route(routes):
            torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
        with context.route(None):
            torch.testing.assert_close(layer(x), text_only, rtol=1e-5, atol=1e-5)
    layer.unfold(original.clone())
    context.folded = False
    assert torch.equal(layer.base.weight, original)


def test_a_folded_model_with_text_only_tokens_runs_the_bare_base() -> None:
    layer, context = _layer(MAPPINGS["decoupled"])
    layer.fold("language")
    context.folded = True
    with context.route(torch.zeros(2, 5, dtype=torch.long)):
        assert context.plan is None
    with context.route(None):
        assert context.plan is None


def test_each_route_is_one_slice_and_minus_text_one_term_over_all_modality_rows() -> None:
    context = RouteContext(MAPPINGS["non-adjacent"])
    context.folded = True
    routes = torch.tensor([[3, 0, 1, 2, 1], [0, 3, 3, 2, 0]])
    with context.route(routes):
        plan = context.plan
        assert plan.rows.tolist() == [2, 4, 3, 8, 0, 6, 7] and plan.count == 7
        assert [(t.delta, t.sign, t.start, t.stop) for t in plan.terms] == [
            ("language", -1, 0, 7), ("image", 1, 0, 2), ("audio", 1, 2, 4), ("image", 1, 4, 7)]
    context.folded = False
    with context.route(routes):
        assert [(t.delta, t.start, t.stop) for t in context.plan.terms] == [
            ("language", 0, 3), ("image", 3, 5), ("audio", 5, 7), ("image", 7, 10)]


class _IndexDevices(torch.overrides.TorchFunctionMode):
    """Records the device of every index tensor the routed layer gathers or scatters with, and every move
    of an integer tensor to another device."""

    def __init__(self) -> None:
        super().__init__()
        self.indices: list[torch.device] = []
        self.moves = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.index_select:
            self.indices.append(args[2].device)
        elif func is torch.Tensor.index_put_:
            self.indices.append(args[1][0].device)
        elif func is torch.Tensor.to and not args[0].is_floating_point():
            self.moves += 1
        return func(*args, **kwargs)


def test_each_layer_uses_route_indices_on_its_own_device_moved_once_per_device() -> None:
    """A model split over devices: the routes (and so the plan's indices) are on the CPU; two layers sit on a
    second device (`meta` stands in for a GPU) and one on the CPU. Every gather and scatter (training's form of the
    plan) must use indices on its layer's device, and the indices move to the second device once, not once per
    layer. (Inference's in-place runs use no index tensor.)"""
    mapping = MAPPINGS["decoupled"]
    layers = [_layer(mapping, seed)[0] for seed in range(3)]
    context = RouteContext(mapping)
    for layer, device in zip(layers, ("meta", "cpu", "meta"), strict=True):
        layer._context = context
        layer.to(device)
    routes = torch.tensor([[0, 1, 1, 2, 0, 0]])
    seen = _IndexDevices()
    with context.route(routes), seen:
        for layer in layers:
            out = layer(torch.randn(1, 6, 12, device=layer.base.weight.device))
            assert out.device == layer.base.weight.device and out.shape == (1, 6, 10)
    meta, cpu = torch.device("meta"), torch.device("cpu")
    assert seen.indices == [meta, meta, cpu, cpu, meta, meta]
    assert seen.moves == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("alpha", [8.0, 2.0, 4.0, 6.0])
def test_lora_forward_is_peft_order_bit_for_bit(dtype: torch.dtype, alpha: float) -> None:
    """Scaling the rank-r intermediate (powers of two) must give exactly PEFT's `B(A x) * scaling`."""
    torch.manual_seed(0)
    delta = LoRADelta(64, 48, 4, alpha, dtype=dtype)
    torch.nn.init.normal_(delta.lora_B)
    x = torch.randn(37, 64, dtype=dtype)
    with torch.no_grad():
        peft_order = F.linear(F.linear(x, delta.lora_A), delta.lora_B) * delta.scaling
        assert torch.equal(delta(x), peft_order)
        assert torch.equal(delta(x, -1), -peft_order)


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
