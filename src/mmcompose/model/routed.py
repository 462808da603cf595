"""Routed deltas: `y = W x + D_{r(x)} x` for every adapted linear of a stock transformers LLM.

Each token carries a route: `0` for text (every token that did not come from a connector, generated
tokens included) and one id per modality. A delta serves one or more routes. Per forward, the model sets
the routes once on a shared `RouteContext`, which turns them into a `RoutePlan`; every `RoutedLinear` then
runs its base matmul once over all tokens and adds each delta only on the tokens of its routes, in one of two
forms: at inference, when each route's tokens are one run of consecutive tokens (one prompt, one input per
modality), in place into the base output, with no gather or scatter; otherwise (training, batches), on the
tokens gathered once, sorted by route so that each route is one contiguous slice, with one scatter-add back.

The text route's delta can be folded into `W` (`W += D_text`), so that generated tokens cost exactly what the
base LLM costs. A modality route `m` then needs `D_m - D_text`: the plan applies `D_m` and `-D_text` to `m`'s
tokens from the factors the model already holds (nothing is materialised, so folding costs no memory beyond
`W` itself). Unfolding restores `W` from the base LLM's own weight files.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

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


def _is_power_of_two(value: float) -> bool:
    return value > 0 and math.frexp(value)[0] == 0.5


class LoRADelta(nn.Module):
    """`D = (alpha / rank) * B @ A`, applied as two thin matmuls; B starts at zero as in LoRA/PEFT.

    PEFT scales the output (`B(A x) * scaling`); when `scaling` is a power of two we scale the rank-r
    intermediate instead (`B(scaling * A x)`): multiplying by a power of two is exact, so the result is the
    same bit for bit (checked in float32 and bfloat16 by tests/model/test_routed.py; float16's narrow range
    can make the two differ in the last bit), and the multiply touches `rank` columns instead of
    `out_features` (measured on one thread, 400 tokens x 768, rank 16: on the output it made a LoRA's forward
    and backward 16-24% slower than unscaled, on the intermediate ~3%). Any other scaling is applied to the
    output, as PEFT does.

    `dropout` drops inputs of `A` in training mode (LoRA's `lora_dropout`, as PEFT applies it); a training
    setting, set by the trainer and never saved.
    """

    dropout: float = 0.0

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float,
                 dtype: torch.dtype | None = None, device: torch.device | None = None) -> None:
        super().__init__()
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, dtype=dtype, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor, sign: int = 1) -> torch.Tensor:
        """`sign * D x`; the sign rides on the scaling (negation is exact)."""
        if self.dropout and self.training:
            x = F.dropout(x, self.dropout, training=True)
        scaling = sign * self.scaling
        if _is_power_of_two(self.scaling):
            return F.linear(F.linear(x, self.lora_A) * scaling, self.lora_B)
        return F.linear(F.linear(x, self.lora_A), self.lora_B) * scaling

    def add_into(self, out: torch.Tensor, x: torch.Tensor, sign: int = 1) -> None:
        """`out += sign * D x` for 2-D `x` and `out`, in place: the scaling and the add ride on one `addmm_`, so
        no `out`-sized temporary is made (inference only: see `RoutePlan`). One rounding where `forward` plus an
        add has two, so the two forms agree to the last bit or so, not bit for bit."""
        out.addmm_(F.linear(x, self.lora_A), self.lora_B.t(), alpha=sign * self.scaling)

    def matrix(self) -> torch.Tensor:
        return lora_product(self.lora_A, self.lora_B, self.scaling)


class DenseDelta(nn.Module):
    """A full-rank `D` (`W_ft - W_base`): what a full fine-tune or a non-low-rank merge leaves."""

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype | None = None,
                 device: torch.device | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(out_features, in_features, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor, sign: int = 1) -> torch.Tensor:
        """`sign * D x`."""
        out = F.linear(x, self.weight)
        return out if sign == 1 else -out

    def add_into(self, out: torch.Tensor, x: torch.Tensor, sign: int = 1) -> None:
        """`out += sign * D x` for 2-D `x` and `out`, in place, as one `addmm_`."""
        out.addmm_(x, self.weight.t(), alpha=sign)

    def matrix(self) -> torch.Tensor:
        return self.weight


Delta = LoRADelta | DenseDelta


def difference(minuend: Delta | None, subtrahend: Delta) -> Delta:
    """`minuend - subtrahend` as one delta: low-rank (concatenated factors) when both are LoRA, else dense.

    For writing a correction out (`mmcompose export`); the running model never materialises it."""
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


Need = tuple[tuple[str, int], ...]
"""The (delta name, sign) pairs one token needs on top of the base weights."""


@dataclass(frozen=True)
class Term:
    """`sign * delta` applied to the gathered rows `[start, stop)`."""

    delta: str
    sign: int
    start: int
    stop: int


@dataclass(frozen=True)
class Run:
    """Consecutive flat rows `[start, stop)` (stop None: to the end) that need the same deltas."""

    start: int
    stop: int | None
    needs: Need


@dataclass
class RoutePlan:
    """What one forward applies, shared by every `RoutedLinear` of the model, in two equivalent forms.

    `runs`: the stretches of consecutive tokens that need a delta, in token order (a prompt's modality input is
    one run: its features and boundary tokens). Inference adds each run's deltas into the base output in place,
    with no gather or scatter. Only when each route that needs a delta is one run (one prompt, one input per
    modality, text folded away), else None: more runs mean more small matmuls than one gather costs, down to
    one-token runs (a newline between two inputs), whose one-row products BLAS computes in an order that
    depends on the factors' memory alignment (a checkpoint memory-mapped from its file then gives other bits).

    `rows`, `count`, `terms`: the flat token indices that need a delta, sorted by route (stably, so each route's
    rows keep their order and form one contiguous slice), how many there are, and the terms over them; `rows`
    None means every row, in order. Either the first term covers all `count` rows and the others are slices of it
    (a folded model: `-D_text` over all modality rows, `D_m` on each route's slice), or the terms tile the rows
    in order (one delta per route). Training uses this form: one gather and one scatter per linear, and no
    in-place add into a view of the base output (autograd would copy the whole output for each).

    The indices live on the device of the routes tensor (the embedding's); a layer placed on another device (a
    model split over GPUs by accelerate) asks `rows_on(device)`, which moves them once per device per forward and
    hands every later layer on that device the same copy.
    """

    runs: list[Run] | None
    rows: torch.Tensor | None
    count: int | None
    terms: list[Term]
    _by_device: dict[torch.device, torch.Tensor] = field(default_factory=dict, repr=False)

    @classmethod
    def everywhere(cls, needs: Need) -> RoutePlan:
        """Every token needs the same deltas."""
        return cls([Run(0, None, needs)], None, None, [Term(name, sign, 0, 0) for name, sign in needs])

    def rows_on(self, device: torch.device) -> torch.Tensor | None:
        if self.rows is None or self.rows.device == device:
            return self.rows
        moved = self._by_device.get(device)
        if moved is None:
            moved = self._by_device[device] = self.rows.to(device)
        return moved


class RouteContext:
    """Model-wide routing state shared by every `RoutedLinear` of one model.

    `route_to_delta` maps a route id to the name of the delta serving it; `folded` says the text route's
    delta lives in `W`. `plan` is what the current forward applies, computed once per forward instead of
    once per layer (None: only the base weights).
    """

    def __init__(self, route_to_delta: dict[int, str]) -> None:
        self.route_to_delta = dict(route_to_delta)
        self.folded = False
        self.plan: RoutePlan | None = None

    @contextmanager
    def route(self, routes: torch.Tensor | None) -> Iterator[None]:
        """Apply deltas by `routes` (any shape, one id per token) inside the block; None means all text."""
        self.plan = self._make_plan(routes)
        try:
            yield
        finally:
            self.plan = None

    def _needs(self, route: int) -> Need:
        """What a token of `route` needs on top of the base weights as they are now (folded or not)."""
        text, own = self.route_to_delta.get(TEXT_ROUTE), self.route_to_delta.get(route)
        if not self.folded:
            return () if own is None else ((own, 1),)
        if route == TEXT_ROUTE or own == text:
            return ()
        return tuple(([] if own is None else [(own, 1)]) + ([] if text is None else [(text, -1)]))

    def _make_plan(self, routes: torch.Tensor | None) -> RoutePlan | None:
        if routes is None:
            needs = self._needs(TEXT_ROUTE)
            return RoutePlan.everywhere(needs) if needs else None
        flat = routes.reshape(-1)
        present, counts = torch.unique(flat, return_counts=True)
        needs = {route: self._needs(route) for route in present.tolist()}
        if len(set(needs.values())) == 1:  # every token alike
            alike = next(iter(needs.values()))
            return RoutePlan.everywhere(alike) if alike else None
        order = torch.argsort(flat, stable=True)
        slices: list[torch.Tensor] = []
        terms: list[Term] = []
        start = cursor = 0
        for route, count in zip(needs, counts.tolist(), strict=True):
            if needs[route]:
                slices.append(order[start:start + count])
                for name, sign in needs[route]:
                    joined = next((t for t in terms if (t.delta, t.sign, t.stop) == (name, sign, cursor)), None)
                    if joined is None:
                        terms.append(Term(name, sign, cursor, cursor + count))
                    else:
                        terms[terms.index(joined)] = Term(name, sign, joined.start, cursor + count)
                cursor += count
            start += count
        if not slices:
            return None
        terms.sort(key=lambda term: (term.start, -term.stop))
        rows = slices[0] if len(slices) == 1 else torch.cat(slices)
        values, lengths = torch.unique_consecutive(flat, return_counts=True)
        runs, start = [], 0
        for route, length in zip(values.tolist(), lengths.tolist(), strict=True):
            if needs[route]:
                runs.append(Run(start, start + length, needs[route]))
            start += length
        return RoutePlan(runs if len(runs) == len(slices) else None, rows, cursor, terms)


class RoutedLinear(nn.Module):
    """A stock `nn.Linear` plus named deltas, applied per token according to the shared `RouteContext`.

    Over a quantized base (bitsandbytes, `packed`), deltas are made in `compute_dtype`, the base is always
    called as a module and nothing is folded into it (`mmcompose.model.quantize`). Any other `nn.Linear`
    subclass is refused here, naming the layer (`name`).

    What routing costs a folded prefill (benchmarks/routing_parts.py: the 4-modality model of
    benchmarks/routing.py, one thread, CPU time of prefills paired back to back with the same prefill with part of
    the work off; ranges over 3-5 runs on a loaded machine): the delta products are 8.5-11% of it, of which the
    A-sides (`x A^T`) 5-6% and the B-side `addmm_` 1.5-4.5%; the loop over runs, its slices and lookups 0.2-2%;
    building the plan 0.03%. That is 448 thin products and 448 `addmm_` per forward (rank 16 + 16 on 146 of 261
    tokens: 5.5% of the base linears' FLOPs) at about half the base matmul's throughput. Tried against this code
    in the same process, none measurably faster (medians 0.97-1.00 in 24-70 pairs, quartiles reaching 1.0), so
    none kept: `-D_text`'s A-side once over the span of all modality runs and one B-side `addmm_` over it (text
    rows zeroed); the factors stored transposed (contiguous `A^T`, `B^T`); factor views resolved once per layer
    instead of per call, with `mm` for `F.linear`; the A-sides computed before the base matmul; the deltas
    written first and the base accumulated on top.
    """

    def __init__(self, base: nn.Linear, context: RouteContext, *, name: str = "",
                 compute_dtype: torch.dtype = DEFAULT_COMPUTE_DTYPE) -> None:
        super().__init__()
        self.packed = routable_linear(base, name)
        self._delta_dtype = compute_dtype if self.packed else None
        self.base = base
        self.deltas = nn.ModuleDict()
        self._context = context

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
        if plan is None:
            # F.linear on the base's weight rather than calling the base module: a folded model's decode step
            # then costs one module call per linear, as the bare LLM's does (measured in benchmarks/routing.py);
            # a packed (quantized) weight is only read by its own module
            return self.base(x) if self.packed else F.linear(x, self.base.weight, self.base.bias)
        y = self.base(x)
        if self.packed and torch.is_grad_enabled():
            y = y.clone()  # bitsandbytes' matmuls are autograd Functions whose outputs may not be added into in place
        if plan.runs is not None and not torch.is_grad_enabled():
            flat_x, flat_y = x.reshape(-1, x.shape[-1]), y.view(-1, y.shape[-1])
            for run in plan.runs:
                xs, ys = (flat_x, flat_y) if run.stop is None else (flat_x[run.start:run.stop],
                                                                    flat_y[run.start:run.stop])
                for name, sign in run.needs:
                    self.deltas[name].add_into(ys, xs, sign)
            return y
        if plan.rows is None:
            for term in plan.terms:
                y.add_(self.deltas[term.delta](x, term.sign))
            return y
        flat_x, flat_y = x.reshape(-1, x.shape[-1]), y.view(-1, y.shape[-1])
        rows = plan.rows_on(x.device)
        gathered = flat_x.index_select(0, rows)
        first = plan.terms[0]
        if first.stop - first.start == plan.count:  # the others are slices of the first: add in place
            update = self.deltas[first.delta](gathered, first.sign)
            for term in plan.terms[1:]:
                span = term.stop - term.start
                update.narrow(0, term.start, span).add_(self.deltas[term.delta](gathered.narrow(0, term.start, span),
                                                                                 term.sign))
        else:  # the terms tile the rows in order
            parts = [self.deltas[t.delta](gathered.narrow(0, t.start, t.stop - t.start), t.sign)
                     for t in plan.terms]
            update = parts[0] if len(parts) == 1 else torch.cat(parts)
        # index_put_ rather than index_add_: same result for unique indices, without index_add_'s
        # parallel-region overhead, which dominates on the small updates of decoding
        flat_y.index_put_((rows,), update, accumulate=True)
        return y

    def fold_refusal(self) -> str | None:
        """Why `W += D_text` cannot be done in place on this layer, or None."""
        weight = self.base.weight
        if self.packed:
            return f"its weight is quantized ({type(self.base).__name__}): the text delta stays unfused"
        if type(self.base) is not nn.Linear:
            return f"its base is a {type(self.base).__name__}, not a plain nn.Linear"
        if not weight.is_floating_point():
            return f"its weight is {weight.dtype}"
        return None

    @torch.no_grad()
    def fold(self, text_delta: str) -> None:
        """`W += D_text`, in place, in `W`'s dtype. A LoRA in `W`'s dtype goes through `addmm_` (`W += s * B @ A`,
        accumulated in float32 and rounded once: in bf16, measured equal to the float64 sum rounded), which needs no
        `out x in` temporary; anything else adds its
        matrix cast to `W`'s dtype."""
        refusal = self.fold_refusal()
        if refusal is not None:
            raise MMComposeError(f"cannot fold a delta into this layer: {refusal}")
        weight, delta = self.base.weight, self.deltas[text_delta]
        if isinstance(delta, LoRADelta) and delta.lora_A.dtype == weight.dtype:
            weight.addmm_(delta.lora_B, delta.lora_A, alpha=delta.scaling)
        else:
            weight.add_(delta.matrix().to(weight.dtype))

    @torch.no_grad()
    def unfold(self, stored: torch.Tensor) -> None:
        """Put back the original `W` from `stored`, its tensor in the base LLM's weight files: cast by `copy_`
        exactly as loading cast it, so `W` is again what a fresh load in this dtype gives, bit for bit."""
        self.base.weight.copy_(stored)

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
