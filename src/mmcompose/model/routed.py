"""Routed deltas: `y = W x + D_{r(x)} x` for every adapted linear of a stock transformers LLM.

Each token carries a route: `0` for text (every token that did not come from a connector, generated
tokens included) and one id per modality. A delta serves one or more routes. Per forward, the model sets
the routes once on a shared `RouteContext`, which turns them into a plan of (delta, token indices); every
`RoutedLinear` then runs its base matmul once over all tokens and adds each delta only on the tokens of its
routes (gather -> low-rank product -> scatter-add). The text route's delta can be folded into `W`, so that
generated tokens cost exactly what the base LLM costs; modality routes then apply `D_m - D_text`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from mmcompose.errors import MMComposeError
from mmcompose.model.quantize import DEFAULT_COMPUTE_DTYPE, routable_linear

TEXT_ROUTE = 0
DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def lora_product(lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """The delta a LoRA stands for, `scaling * B @ A` with `scaling = alpha / rank` (PEFT's convention), in
    the factors' dtype: the one place composition, diagnostics and the model form it."""
    return (lora_b @ lora_a) * scaling


class LoRADelta(nn.Module):
    """`D = (alpha / rank) * B @ A`, applied as two thin matmuls; B starts at zero as in LoRA/PEFT."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float,
                 dtype: torch.dtype | None = None, device: torch.device | None = None) -> None:
        super().__init__()
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, dtype=dtype, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scaling

    def matrix(self) -> torch.Tensor:
        return lora_product(self.lora_A, self.lora_B, self.scaling)


class DenseDelta(nn.Module):
    """A full-rank `D` (`W_ft - W_base`): what a full fine-tune or a non-low-rank merge leaves."""

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype | None = None,
                 device: torch.device | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(out_features, in_features, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)

    def matrix(self) -> torch.Tensor:
        return self.weight


Delta = LoRADelta | DenseDelta


def difference(minuend: Delta | None, subtrahend: Delta) -> Delta:
    """`minuend - subtrahend` as one delta: low-rank (concatenated factors) when both are LoRA, else dense."""
    with torch.no_grad():
        if isinstance(subtrahend, LoRADelta) and not isinstance(minuend, DenseDelta):
            parts = [] if minuend is None else [(minuend.lora_A, minuend.lora_B * minuend.scaling)]
            parts.append((subtrahend.lora_A, -subtrahend.lora_B * subtrahend.scaling))
            rank = sum(a.shape[0] for a, _ in parts)
            result: Delta = LoRADelta(subtrahend.lora_A.shape[1], subtrahend.lora_B.shape[0], rank, rank,
                                      dtype=subtrahend.lora_A.dtype, device=subtrahend.lora_A.device)
            result.lora_A.copy_(torch.cat([a for a, _ in parts]))
            result.lora_B.copy_(torch.cat([b for _, b in parts], dim=1))
        else:
            removed = subtrahend.matrix()
            result = DenseDelta(removed.shape[1], removed.shape[0], dtype=removed.dtype, device=removed.device)
            result.weight.copy_(-removed if minuend is None else minuend.matrix() - removed)
    return result.requires_grad_(False)


class RouteContext:
    """Model-wide routing state shared by every `RoutedLinear` of one model.

    `route_to_delta` maps a route id to the name of the delta serving it. `plan` is what the current
    forward applies: a list of (delta name, flat token indices or None for "every token"), computed once
    per forward instead of once per layer.
    """

    def __init__(self, route_to_delta: dict[int, str]) -> None:
        self.route_to_delta = dict(route_to_delta)
        self.folded_route_to_delta: dict[int, str] = {}
        self.folded = False
        self.plan: list[tuple[str, torch.Tensor | None]] = []

    @contextmanager
    def route(self, routes: torch.Tensor | None) -> Iterator[None]:
        """Apply deltas by `routes` (any shape, one id per token) inside the block; None means all text."""
        self.plan = self._make_plan(routes)
        try:
            yield
        finally:
            self.plan = []

    def _make_plan(self, routes: torch.Tensor | None) -> list[tuple[str, torch.Tensor | None]]:
        mapping = self.folded_route_to_delta if self.folded else self.route_to_delta
        if routes is None:
            name = mapping.get(TEXT_ROUTE)
            return [] if name is None else [(name, None)]
        flat = routes.reshape(-1)
        present = torch.unique(flat).tolist()
        groups: dict[str, list[int]] = {}
        for route in present:
            if route in mapping:
                groups.setdefault(mapping[route], []).append(route)
        plan: list[tuple[str, torch.Tensor | None]] = []
        for name, members in groups.items():
            if len(members) == len(present):
                plan.append((name, None))
            else:
                selected = torch.isin(flat, torch.tensor(members, device=flat.device))
                plan.append((name, selected.nonzero().squeeze(1)))
        return plan


class RoutedLinear(nn.Module):
    """A stock `nn.Linear` plus named deltas, applied per token according to the shared `RouteContext`.

    Over a quantized base (bitsandbytes, `packed`), deltas are made in `compute_dtype`, the base is always
    called as a module and nothing is folded into it (`mmcompose.model.quantize`). Any other `nn.Linear`
    subclass is refused here, naming the layer (`name`).
    """

    def __init__(self, base: nn.Linear, context: RouteContext, *, name: str = "",
                 compute_dtype: torch.dtype = DEFAULT_COMPUTE_DTYPE) -> None:
        super().__init__()
        self.packed = routable_linear(base, name)
        self._delta_dtype = compute_dtype if self.packed else None
        self.base = base
        self.deltas = nn.ModuleDict()
        self.corrections = nn.ModuleDict()
        self._context = context
        self._unfolded_weight: torch.Tensor | None = None

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def add_delta(self, name: str, kind: str, rank: int | None = None, alpha: float | None = None, *,
                  device: torch.device | str | None = None) -> Delta:
        """A new delta in the base weight's dtype (the compute dtype over a packed one), on the base weight's device
        unless `device` says otherwise (`meta` when a loader fills it in place from a checkpoint: nothing is
        allocated or initialised)."""
        factory = dict(dtype=self._delta_dtype or self.base.weight.dtype,
                       device=self.base.weight.device if device is None else device)
        if kind == "lora":
            delta: Delta = LoRADelta(self.in_features, self.out_features, rank, alpha, **factory)
        else:
            delta = DenseDelta(self.in_features, self.out_features, **factory)
        self.deltas[name] = delta
        return delta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        plan = self._context.plan
        if not plan and not self.packed:
            # F.linear on the base's weight rather than calling the base module: a folded model's decode step
            # then costs one module call per linear, as the bare LLM's does (measured in benchmarks/routing.py)
            return F.linear(x, self.base.weight, self.base.bias)
        y = self.base(x)
        if self.packed and torch.is_grad_enabled():
            y = y.clone()  # bitsandbytes' matmuls are autograd Functions whose outputs may not be added into in place
        table = self.corrections if self._context.folded else self.deltas
        flat_x, flat_y = x.reshape(-1, x.shape[-1]), y.view(-1, y.shape[-1])
        for name, index in plan:
            if name not in table:
                continue
            if index is None:
                y.add_(table[name](x))
            else:
                # index_put_ rather than index_add_: same result for unique indices, without index_add_'s
                # parallel-region overhead, which dominates on the small updates of decoding
                flat_y.index_put_((index,), table[name](flat_x.index_select(0, index)), accumulate=True)
        return y

    def _delta(self, name: str | None) -> Delta | None:
        return self.deltas[name] if name in self.deltas else None  # noqa: SIM401 - ModuleDict has no .get

    @torch.no_grad()
    def fold(self, text_delta: str | None, modality_deltas: set[str]) -> None:
        """Add the text delta to `W` (keeping the exact original on CPU) and derive `D_m - D_text`."""
        if self.packed:
            raise MMComposeError("cannot fold a delta into a quantized (packed) weight: over a quantized base the "
                                 "text route's delta is applied unfused")
        text = self._delta(text_delta)
        self._unfolded_weight = self.base.weight.detach().to("cpu", copy=True)
        for name in modality_deltas:
            own = self._delta(name)
            if text is None:
                if own is not None:
                    self.corrections[name] = own
            else:
                self.corrections[name] = difference(own, text)
        if text is not None:
            self.base.weight.add_(text.matrix().to(self.base.weight.dtype))

    @torch.no_grad()
    def unfold(self) -> None:
        """Restore the original `W` bit for bit and drop the derived corrections."""
        self.base.weight.copy_(self._unfolded_weight)
        self._unfolded_weight = None
        self.corrections = nn.ModuleDict()


def wrap_linears(llm: nn.Module, target_modules: tuple[str, ...], context: RouteContext,
                 compute_dtype: torch.dtype = DEFAULT_COMPUTE_DTYPE) -> dict[str, RoutedLinear]:
    """Replace every `nn.Linear` whose attribute name is in `target_modules` by a `RoutedLinear`.

    Module surgery by `setattr` on the parent, as PEFT's tuners do; the model's own code is untouched.
    Returns the wrapped layers keyed by their path in `llm`. `compute_dtype`: the deltas' dtype over a
    quantized layer. An `nn.Linear` subclass a routed layer cannot handle is refused before any is wrapped.
    """
    targets = [(path, module) for path, module in llm.named_modules()
               if path.rpartition(".")[2] in target_modules and isinstance(module, nn.Linear)]
    for path, module in targets:
        routable_linear(module, path)
    wrapped: dict[str, RoutedLinear] = {}
    for path, module in targets:
        parent_path, _, attribute = path.rpartition(".")
        routed = RoutedLinear(module, context, name=path, compute_dtype=compute_dtype)
        setattr(llm.get_submodule(parent_path), attribute, routed)
        wrapped[path] = routed
    return wrapped
