"""Where routing's prefill cost goes: the composed model of benchmarks/routing.py with parts of the delta work off.

The folded 4-modality model's prefill (`model(batch)`, one thread) is timed in CPU time in pairs, back to back
with the same prefill with one part of the work removed (order alternating), and the per-pair ratio's median
and quartiles are reported:

* no-products - `LoRADelta.add_into` does nothing: what is left is the base, the loop over runs and the plan;
* A-side only - only each delta's `x A^T` is computed;
* B-side only - only the `addmm_` of a zero intermediate into the output;
* no-plan     - the forward outside a route block (no plan, no loop: the bare base's cost in our code).

`1 - ratio` is then the share of the routed prefill that the removed part costs. Also timed: building the plan
(`RouteContext._make_plan`) alone, and the prefill against transformers' on the bare base, as the anchor.
Run: `python benchmarks/routing_parts.py`.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from datetime import date
from pathlib import Path

import torch
import torch.nn.functional as F
from report import publish
from routing import build, four_input_example, make_base
from transformers import LlamaForCausalLM

from mmcompose.model.routed import LoRADelta


def _products_off(self: LoRADelta, out: torch.Tensor, x: torch.Tensor, sign: int = 1) -> None:
    return None


def _a_side_only(self: LoRADelta, out: torch.Tensor, x: torch.Tensor, sign: int = 1) -> None:
    F.linear(x, self.lora_A)


_ZEROS: dict[tuple[int, int], torch.Tensor] = {}


def _b_side_only(self: LoRADelta, out: torch.Tensor, x: torch.Tensor, sign: int = 1) -> None:
    key = (x.shape[0], self.rank)
    if key not in _ZEROS:
        _ZEROS[key] = torch.zeros(key, dtype=x.dtype)
    out.addmm_(_ZEROS[key], self.lora_B.t(), alpha=sign * self.scaling)


PARTS = {"no-products": _products_off, "A-side only": _a_side_only, "B-side only": _b_side_only}


@contextmanager
def add_into(replacement: Callable | None):
    original = LoRADelta.add_into
    if replacement is not None:
        LoRADelta.add_into = replacement
    try:
        yield
    finally:
        LoRADelta.add_into = original


def cpu_seconds(function: Callable[[], object]) -> float:
    start = time.process_time()
    function()
    return time.process_time() - start


def paired(first: Callable[[], float], second: Callable[[], float], count: int) -> list[float]:
    """`second / first` per pair, the two timed back to back in alternating order."""
    ratios = []
    for index in range(count):
        if index % 2:
            a, b = first(), second()
        else:
            b, a = second(), first()
        ratios.append(b / a)
    return ratios


def summary(ratios: list[float]) -> str:
    quartiles = statistics.quantiles(ratios, n=4)
    return f"{statistics.median(ratios):.3f} | {quartiles[0]:.3f}-{quartiles[2]:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--pairs", type=int, default=40)
    parser.add_argument("--results", type=Path, default=Path(__file__).with_name("RESULTS.md"))
    args = parser.parse_args()
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as scratch:
        base_path = make_base(Path(scratch) / "base")
        model = build(base_path, "decoupled", args.rank)
        example = four_input_example()
        with torch.no_grad():
            batch = model.assemble([example], padding_side="left")
        model.fold_text_route()
        reference = LlamaForCausalLM.from_pretrained(base_path).eval()
        embeds = batch.embeds.detach()

        def routed(replacement: Callable | None = None) -> float:
            with add_into(replacement):
                return cpu_seconds(lambda: model(batch, logits_to_keep=1))

        def no_plan() -> float:
            return cpu_seconds(lambda: model.llm(inputs_embeds=batch.embeds, attention_mask=batch.attention_mask,
                                                 position_ids=batch.position_ids, logits_to_keep=1))

        def hf() -> float:
            return cpu_seconds(lambda: reference(inputs_embeds=embeds, attention_mask=batch.attention_mask,
                                                 logits_to_keep=1))

        load_start = os.getloadavg()
        rows = []
        with torch.no_grad():
            for _ in range(3):  # warm-up
                routed(), hf(), no_plan()
            milliseconds = statistics.median(1000 * routed() for _ in range(5))
            for name, replacement in PARTS.items():
                rows.append((name, paired(routed, lambda r=replacement: routed(r), args.pairs)))
            rows.append(("no-plan", paired(routed, no_plan, args.pairs)))
            anchored = paired(hf, routed, args.pairs)
            plan_times = []
            for _ in range(20):
                start = time.process_time()
                for _ in range(50):
                    model.routing._make_plan(batch.routes)
                plan_times.append((time.process_time() - start) / 50)

    lines = [
        f"## routing parts ({date.today().isoformat()})",
        "",
        f"- command: `python benchmarks/routing_parts.py --rank {args.rank} --pairs {args.pairs}`",
        f"- machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, 1 thread; load "
        f"average (1/5/15 min) {'/'.join(f'{v:.1f}' for v in load_start)} at the start, "
        f"{'/'.join(f'{v:.1f}' for v in os.getloadavg())} at the end",
        f"- folded composed prefill: {milliseconds:.1f} ms CPU (median of 5), prompt "
        f"{int(batch.attention_mask.sum())} tokens ({int((batch.routes > 0).sum())} modality); building the plan "
        f"{1e6 * statistics.median(plan_times):.0f} us",
        "",
        f"| variant | prefill CPU time / the routed prefill's, median of {args.pairs} pairs | quartiles |",
        "|---|---|---|",
        *(f"| {name} | {summary(ratios)} |" for name, ratios in rows),
        "",
        f"- the routed prefill / transformers' on the bare base (hf-generate's prefill), {args.pairs} pairs: median "
        f"{summary(anchored).replace(' | ', ' (quartiles ')})",
    ]
    publish(lines, args.results)


if __name__ == "__main__":
    main()
