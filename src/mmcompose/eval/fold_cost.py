"""What generating costs with the text route folded and unfolded: a deterministic estimate for `eval`'s choice.

Folding moves `D_text` into the base weights, so text positions and every decode step cost what the bare base
costs, while each modality position then needs `D_m` and `-D_text`. Which form is cheaper depends on more than
the number of positions of each kind (benchmarks/fold_decision.py):

* the products' multiply-adds: rank x (in + out) per row of a LoRA;
* a product over few rows costs at least what `floor_rows` rows cost: it reads all its factors whatever the rows
  (the memory-bound floor of a decode step; on a GPU much higher than on this CPU);
* the plan's form (`RoutePlan`): when no route is one run of tokens (batches, or text split by media, which an
  unfolded multimodal prompt always is) every row needing a delta is gathered and scattered back;
* a fixed overhead per tensor op (Python, dispatch, kernel launch), which at small widths outweighs the FLOPs.

The base matmuls are the same in both forms and left out. So is folding itself (one `W += B A` per layer at the
start of a run, undone after): `eval` decides on the first batch of a run that answers many. Every row is taken
to decode all its tokens: rows that stop earlier at EOS make the unfolded form cheaper than estimated. The
estimate is a function of the model's shapes and the batch only, never of a timing: folded and unfolded answers
differ in rounding, and an eval's answers must not depend on the machine's load.

The constants (`COSTS`) are per kind of device and dtype. CPUs come in two kinds, measured on this project's
machines: `cpu` (an AMD EPYC with AVX2 and no native bfloat16, where bfloat16 products are compute-bound even over
one row) and `cpu-bf16` (an Intel Xeon with AVX512-BF16 and AMX, where they run ~100x faster over many rows and a
decode step is bound by reading the factors, as on a GPU). The two disagree where it matters: on the Xeon, a
vicuna-scale MCUB-4 item generates 1.01-1.09x faster folded at 128 new tokens and 1.04-1.13x at 512 (two runs),
where the `cpu` constants choose unfolded. A CPU with AVX512-BF16 but no AMX (AMD's Zen 4) takes `cpu-bf16`,
unmeasured: its bfloat16 products are native too. The CUDA constants are estimates for an A100-class card, not
measured (no GPU here).
The kind of CPU changes which form runs, so answers may differ in rounding from one kind to the other, as any
computation's do across CPUs; on one machine they never depend on its load.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mmcompose.model.generation import PREFILL_CHUNK_SIZE
from mmcompose.model.routed import TEXT_ROUTE, LoRADelta, RouteContext, RoutedLinear, RoutePlan


@dataclass(frozen=True)
class DeviceCosts:
    """Seconds per unit of work of one device type and dtype (see `COSTS`)."""

    multiply_add: float
    """Seconds per multiply-add of a delta's product over many rows."""
    floor_rows: int
    """A product over fewer rows costs what one over this many does (reading its factors)."""
    op: float
    """Fixed seconds of one tensor op (Python, dispatch, launch), whatever its size."""
    gather: float
    """Seconds per element copied by `index_select`, `cat` or an in-place add."""
    scatter: float
    """Seconds per element added back by `index_put_(accumulate=True)`."""


ROUTED_LINEAR_OPS = 6
"""Ops a routed linear with a plan spends beyond the bare `F.linear` it makes without one and beyond its deltas' own
ops (the base module call, views, the plan's checks). Measured (`benchmarks/fold_decision.py --calibrate`): a
routed linear of width 8 with the text delta's plan costs 20 us more per call than without a plan, 7.6 ops of
2.7 us, two of them the delta's."""

COSTS: dict[tuple[str, torch.dtype], DeviceCosts] = {
    # CPU (AMD EPYC, AVX2, no native bf16), one thread, `benchmarks/fold_decision.py --calibrate` (RESULTS.md):
    # float32 thin products reach ~40 GMAC/s over 1024 rows and 2-3 GMAC/s over one row at 4096 wide (14-19 rows'
    # worth: the factors are read from memory); an op costs ~3 us; index_select 0.2 ns per element when its output
    # reuses freed memory, ~4 ns when it is fresh (page faults), index_put_ with accumulate ~0.6-1 ns.
    ("cpu", torch.float32): DeviceCosts(multiply_add=1 / 40e9, floor_rows=16, op=3e-6, gather=1e-9, scatter=1e-9),
    # bfloat16 has no native kernels on this CPU: 3-4 GMAC/s at any number of rows, so no floor (a decode step is
    # compute-bound here, unlike on a CPU with AVX512-BF16/AMX or a GPU); index_put_ ~2.2 ns per element.
    ("cpu", torch.bfloat16): DeviceCosts(multiply_add=1 / 3.5e9, floor_rows=1, op=3e-6, gather=1e-9,
                                         scatter=2.2e-9),
    # CPU with native bfloat16 (Intel Xeon, AVX512-BF16 and AMX), one thread, `--calibrate` of 2026-12-08
    # (RESULTS.md): float32 61-76 GMAC/s over 1024 rows and 3.9-5.0 over one row (15 rows' worth), an op ~1.7 us,
    # index_select 0.2-2 ns per element, index_put_ 0.7-1.2 ns.
    ("cpu-bf16", torch.float32): DeviceCosts(multiply_add=1 / 70e9, floor_rows=15, op=1.7e-6, gather=1e-9,
                                             scatter=1e-9),
    # bfloat16 224-502 GMAC/s over 1024 rows but 3.5-4.7 over one row: a product over fewer than ~65-105 rows
    # costs what reading its factors does; index_put_ 1.4-2.0 ns per element.
    ("cpu-bf16", torch.bfloat16): DeviceCosts(multiply_add=1 / 300e9, floor_rows=80, op=1.7e-6, gather=1e-9,
                                              scatter=1.7e-9),
    # CUDA: estimates, NOT measured (this machine has no GPU): an A100-class card, ~100 TMAC/s in 16-bit and
    # ~2 TB/s, so a product over fewer than ~128 rows is bound by reading its factors; ~10 us per op (launch plus
    # Python) and a few ps per element moved. Both the floor and the overhead favour folding.
    ("cuda", torch.bfloat16): DeviceCosts(multiply_add=1e-14, floor_rows=128, op=10e-6, gather=2e-12,
                                          scatter=4e-12),
    ("cuda", torch.float32): DeviceCosts(multiply_add=5e-14, floor_rows=32, op=10e-6, gather=4e-12, scatter=8e-12),
}
"""Per (kind of device, dtype). Another dtype takes its kind's bfloat16 entry (float16 runs alike); a device other
than CUDA (`meta` included: a model built without weights) takes this machine's kind of CPU."""


@functools.cache
def cpu_kind() -> str:
    """`cpu-bf16` where oneDNN runs bfloat16 products natively (AMX tiles or AVX512-BF16), else `cpu`.

    torch has no public query for it: its private `torch.cpu._is_*_supported` read the cpuinfo library that
    oneDNN's dispatch reads; a torch without them counts as a CPU without."""
    checks = (getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))
    return "cpu-bf16" if any(check is not None and check() for check in checks) else "cpu"


def device_costs(device: torch.device, dtype: torch.dtype) -> DeviceCosts:
    kind = "cuda" if device.type == "cuda" else cpu_kind()
    return COSTS.get((kind, dtype)) or COSTS[kind, torch.bfloat16]


class LinearCost:
    """The seconds one routed linear spends on its deltas under a plan: its widths, its deltas' per-row
    multiply-adds and op counts, and its device's constants."""

    def __init__(self, layer: RoutedLinear) -> None:
        self.inputs, self.outputs = layer.in_features, layer.out_features
        self.row_macs: dict[str, int] = {}
        for name, delta in layer.deltas.items():
            self.row_macs[name] = delta.rank * (self.inputs + self.outputs) if isinstance(delta, LoRADelta) \
                else self.inputs * self.outputs
        self.forward_ops = {name: 3 if isinstance(delta, LoRADelta) else 2 for name, delta in layer.deltas.items()}
        weight = layer.base.weight
        self.costs = device_costs(weight.device, next((p.dtype for p in layer.deltas.parameters()), weight.dtype))

    def product(self, delta: str, rows: int) -> float:
        return max(rows, self.costs.floor_rows) * self.row_macs[delta] * self.costs.multiply_add

    def __call__(self, plan: RoutePlan | None, rows: int) -> float:
        """Seconds of the deltas of one forward over `rows` flat positions under `plan` (None: the base alone)."""
        if plan is None:
            return 0.0
        c = self.costs
        seconds = ROUTED_LINEAR_OPS * c.op
        if plan.runs is not None:  # in place, into the base output: a thin product and an addmm_ per need
            for run in plan.runs:
                span = (rows if run.stop is None else run.stop) - run.start
                seconds += sum(2 * c.op + self.product(name, span) for name, _ in run.needs)
            return seconds
        count = plan.count or rows
        seconds += 2 * c.op + count * (self.inputs * c.gather + self.outputs * c.scatter)
        first = plan.terms[0]
        covering = first.stop - first.start == count
        for term in plan.terms:
            span = term.stop - term.start
            seconds += self.forward_ops[term.delta] * c.op + self.product(term.delta, span)
            if covering and term is not first:  # narrowed and added into the first term's output
                seconds += 2 * c.op + span * self.outputs * c.gather
        if not covering and len(plan.terms) > 1:  # the terms' outputs concatenated
            seconds += c.op + count * self.outputs * c.gather
        return seconds


def generation_seconds(layers: Sequence[RoutedLinear], route_to_delta: dict[int, str], routes: torch.Tensor,
                       max_new_tokens: int, folded: bool) -> float:
    """Estimated seconds the deltas add to generating `max_new_tokens` per row after the left-padded `routes`
    `(rows, positions)`: the prefill in chunks of `PREFILL_CHUNK_SIZE` and `max_new_tokens - 1` decode steps of
    every row (as if no row stopped early), with the text route folded or not."""
    context = RouteContext(route_to_delta)
    context.folded = folded
    costs = [LinearCost(layer) for layer in layers]
    seconds = 0.0
    for start in range(0, routes.shape[1], PREFILL_CHUNK_SIZE):
        chunk = routes[:, start:start + PREFILL_CHUNK_SIZE]
        with context.route(chunk):
            seconds += sum(cost(context.plan, chunk.numel()) for cost in costs)
    if max_new_tokens > 1:
        with context.route(None):
            seconds += (max_new_tokens - 1) * sum(cost(context.plan, routes.shape[0]) for cost in costs)
    return seconds


def folding_pays(layers: Sequence[RoutedLinear], route_to_delta: dict[int, str], routes: torch.Tensor,
                 max_new_tokens: int) -> bool:
    """Whether `generation_seconds` is lower folded. Without a text delta there is nothing to fold (False); when
    every modality shares the text's delta (NaiveMC) a folded model applies no delta at all, which always pays."""
    if route_to_delta.get(TEXT_ROUTE) is None:
        return False
    return generation_seconds(layers, route_to_delta, routes, max_new_tokens, True) < \
        generation_seconds(layers, route_to_delta, routes, max_new_tokens, False)
