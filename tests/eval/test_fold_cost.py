"""The decision to fold the text route, on the cases of benchmarks/fold_decision.py, as measured there.

Only shapes matter to the estimate, so the models are built on the meta device (no weight is allocated): the
demo's composed shape and one decoder layer at vicuna-7b's widths. Each expected value is the winner measured by
`taskset -c 1 python benchmarks/fold_decision.py` (benchmarks/RESULTS.md, `fold_decision`); cases the benchmark
measured as ties (pairs on both sides of 1: the vicuna-scale chat item, most demo batches) are not asserted.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from mmcompose.eval.fold_cost import folding_pays, generation_seconds
from mmcompose.model.routed import DEFAULT_TARGET_MODULES, RouteContext, RoutedLinear, wrap_linears

MODALITIES = ("image", "audio", "video", "point")
ROUTE_TO_DELTA = {0: "language", 1: "image", 2: "audio", 3: "video", 4: "point"}
DEMO_ITEM = [(0, 4), (1, 26), (0, 1), (2, 36), (0, 1), (3, 42), (0, 1), (4, 42), (0, 51)]
"""A demo MCUB-4 item's routes as runs (route, positions), as the demo model assembles it: 58 text, 146 media."""
VICUNA_ITEM = [(0, 7), (1, 586), (0, 1), (2, 46), (0, 1), (3, 2035), (0, 1), (4, 539), (0, 100)]
"""The benchmark's MCUB-4-shaped item at vicuna scale: 110 text positions, 3,206 of media."""


def meta_layers(hidden: int, intermediate: int, layers: int, dtype: torch.dtype, language_rank: int,
                modality_rank: int) -> list[RoutedLinear]:
    config = LlamaConfig(vocab_size=64, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=4)
    with torch.device("meta"):
        llm = LlamaForCausalLM(config).to(dtype)
    routed = wrap_linears(llm, DEFAULT_TARGET_MODULES, RouteContext(ROUTE_TO_DELTA))
    for layer in routed.values():
        layer.add_delta("language", "lora", language_rank, float(language_rank))
        for name in MODALITIES:
            layer.add_delta(name, "lora", modality_rank, 2.0 * modality_rank)
    return list(routed.values())


def routes(runs: list[tuple[int, int]], rows: int = 1) -> torch.Tensor:
    row = torch.cat([torch.full((length,), route) for route, length in runs])
    return row.expand(rows, -1).clone()


@pytest.fixture(scope="module")
def demo() -> list[RoutedLinear]:
    return meta_layers(128, 344, 3, torch.float32, 64, 16)


@pytest.fixture(scope="module")
def vicuna() -> list[RoutedLinear]:
    return meta_layers(4096, 11008, 1, torch.bfloat16, 512, 128)


@pytest.mark.parametrize(("rows", "tokens"), [
    (1, 32),  # measured unfolded / folded 1.30x (pairs 1.06-1.44)
    (16, 32),  # measured 1.08x (pairs 1.03-1.27)
])
def test_the_demo_folds_where_folding_was_measured_faster(demo: list[RoutedLinear], rows: int, tokens: int) -> None:
    assert folding_pays(demo, ROUTE_TO_DELTA, routes(DEMO_ITEM, rows), tokens)


@pytest.mark.parametrize("tokens", [1, 16, 128, 512])
def test_a_vicuna_scale_mcub_item_stays_unfolded(vicuna: list[RoutedLinear], tokens: int) -> None:
    """Measured: unfolded faster at every budget (prefill of ~3,200 media positions dominates)."""
    assert not folding_pays(vicuna, ROUTE_TO_DELTA, routes(VICUNA_ITEM), tokens)


def test_what_the_estimate_cannot_miss(demo: list[RoutedLinear]) -> None:
    """Structural cases, whatever the constants: nothing to fold without a text delta; nothing left to correct
    when the media share the text's delta; text alone always pays; each form's estimate grows with the answer."""
    item = routes(DEMO_ITEM, 8)
    assert not folding_pays(demo, {1: "image"}, item, 32)
    shared = {route: "language" for route in ROUTE_TO_DELTA}
    assert folding_pays(demo, shared, item, 1)
    assert generation_seconds(demo, shared, item, 1, folded=True) == 0.0
    assert folding_pays(demo, ROUTE_TO_DELTA, routes([(0, 200)], 8), 1)
    unfolded = [generation_seconds(demo, ROUTE_TO_DELTA, item, tokens, folded=False) for tokens in (1, 32)]
    folded = [generation_seconds(demo, ROUTE_TO_DELTA, item, tokens, folded=True) for tokens in (1, 32)]
    assert unfolded[0] < unfolded[1] and folded[0] == folded[1]  # a folded decode step applies no delta
