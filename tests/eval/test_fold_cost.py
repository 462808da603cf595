"""The decision to fold the text route, on the cases of benchmarks/fold_decision.py, as measured there.

Only shapes matter to the estimate, so the models are built on the meta device (no weight is allocated): the
demo's composed shape and one decoder layer at vicuna-7b's widths. Each expected value is the winner measured by
`taskset -c 1 python benchmarks/fold_decision.py` (benchmarks/RESULTS.md, `fold_decision`) on one of the two kinds
of CPU the estimate knows, pinned here whatever this machine is: `cpu` (AVX2, no native bfloat16) and `cpu-bf16`
(AVX512-BF16 and AMX). Cases the benchmark measured as ties (pairs on both sides of 1) are not asserted.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from mmcompose.eval import fold_cost
from mmcompose.eval.fold_cost import COSTS, device_costs, folding_pays, generation_seconds
from mmcompose.model.routed import DEFAULT_TARGET_MODULES, RouteContext, RoutedLinear, wrap_linears

MODALITIES = ("image", "audio", "video", "point")
ROUTE_TO_DELTA = {0: "language", 1: "image", 2: "audio", 3: "video", 4: "point"}
DEMO_ITEM = [(0, 4), (1, 26), (0, 1), (2, 36), (0, 1), (3, 42), (0, 1), (4, 42), (0, 51)]
"""A demo MCUB-4 item's routes as runs (route, positions), as the demo model assembles it: 58 text, 146 media."""
VICUNA_ITEM = [(0, 7), (1, 586), (0, 1), (2, 46), (0, 1), (3, 2035), (0, 1), (4, 539), (0, 100)]
"""The benchmark's MCUB-4-shaped item at vicuna scale: 110 text positions, 3,206 of media."""
VICUNA_CHAT = [(0, 7), (1, 586), (0, 319)]
"""The benchmark's chat item at vicuna scale: one image, 326 text positions."""


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


@pytest.fixture
def avx2(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fold_cost, "cpu_kind", lambda: "cpu")


@pytest.fixture
def amx(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fold_cost, "cpu_kind", lambda: "cpu-bf16")


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
@pytest.mark.usefixtures("avx2")
def test_the_demo_folds_where_folding_was_measured_faster(demo: list[RoutedLinear], rows: int, tokens: int) -> None:
    assert folding_pays(demo, ROUTE_TO_DELTA, routes(DEMO_ITEM, rows), tokens)


@pytest.mark.parametrize("tokens", [1, 16, 128, 512])
@pytest.mark.usefixtures("avx2")
def test_a_vicuna_scale_mcub_item_stays_unfolded(vicuna: list[RoutedLinear], tokens: int) -> None:
    """Measured: unfolded faster at every budget (prefill of ~3,200 media positions dominates)."""
    assert not folding_pays(vicuna, ROUTE_TO_DELTA, routes(VICUNA_ITEM), tokens)


@pytest.mark.parametrize(("rows", "tokens"), [(1, 1), (1, 8), (1, 32), (16, 32)])
@pytest.mark.usefixtures("amx")
def test_with_native_bfloat16_the_demo_folds_where_folding_was_measured_faster(demo: list[RoutedLinear], rows: int,
                                                                               tokens: int) -> None:
    """Measured unfolded / folded, two runs: 1.08x and 1.12x, 1.18x and 1.24x, 1.27x and 1.31x one item at a time
    (1, 8, 32 new tokens); 1.09x and 1.10x for 16 items at 32."""
    assert folding_pays(demo, ROUTE_TO_DELTA, routes(DEMO_ITEM, rows), tokens)


@pytest.mark.parametrize(("item", "tokens", "folds"), [  # measured unfolded / folded in two runs (pairs' range)
    (VICUNA_ITEM, 1, False),  # 0.91x (0.87-0.97), then 0.97x (0.97-1.07): a tie
    (VICUNA_ITEM, 128, True),  # 1.09x (1.04-1.11), 1.01x (1.01-1.12)
    (VICUNA_ITEM, 512, True),  # 1.13x (1.07-1.16), 1.04x (1.03-1.12)
    (VICUNA_CHAT, 16, True),  # 1.15x (1.10-1.24), 1.11x (1.08-1.11)
    (VICUNA_CHAT, 512, True),  # 1.17x (1.11-1.20), 1.07x (1.05-1.10)
])
@pytest.mark.usefixtures("amx")
def test_with_native_bfloat16_a_vicuna_scale_item_folds_for_all_but_the_shortest_answers(
        vicuna: list[RoutedLinear], item: list[tuple[int, int]], tokens: int, folds: bool) -> None:
    """Fast bfloat16 products make the media's extra `-D_text` cheap and a decode step's deltas cost what reading
    their factors does: folding pays early, unlike on the AVX2 CPU, where the same item stays unfolded."""
    assert folding_pays(vicuna, ROUTE_TO_DELTA, routes(item), tokens) == folds


def test_the_kind_of_cpu_is_whether_bfloat16_products_are_native(monkeypatch: pytest.MonkeyPatch) -> None:
    for amx_tiles, avx512_bf16, kind in [(True, True, "cpu-bf16"), (False, True, "cpu-bf16"), (False, False, "cpu")]:
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx_tiles: v, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v, raising=False)
        fold_cost.cpu_kind.cache_clear()
        assert fold_cost.cpu_kind() == kind
        assert device_costs(torch.device("meta"), torch.bfloat16) is COSTS[kind, torch.bfloat16]
        assert device_costs(torch.device("cuda"), torch.bfloat16) is COSTS["cuda", torch.bfloat16]
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")
    fold_cost.cpu_kind.cache_clear()
    assert fold_cost.cpu_kind() == "cpu"  # a torch without the queries: no native bfloat16 assumed
    monkeypatch.undo()
    fold_cost.cpu_kind.cache_clear()


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
