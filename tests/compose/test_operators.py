"""Merge operators: hand-computed expectations, validation, and parity with PEFT.

Expected numbers in the hand-computed tests are worked out from the definitions in the comments next to
them; they never come from the code under test.
"""

import math

import peft
import pytest
import torch
from peft.tuners.lora import LoraLayer
from peft.utils import merge_utils
from transformers import LlamaConfig, LlamaForCausalLM

from mmcompose.compose.operators import (
    METHODS,
    dare_linear,
    dare_ties,
    factorwise_mean,
    linear,
    lora_concat,
    magnitude_prune,
    magnitude_trims,
    merge_chunks,
    ties,
    validate_parameters,
)
from mmcompose.errors import CompositionError

D1 = torch.tensor([[1.0, -2.0], [3.0, 0.5]])
D2 = torch.tensor([[-1.0, 1.0], [2.0, -4.0]])
# Top-2 of 4 entries by magnitude: D1 keeps -2 and 3, D2 keeps 2 and -4.
T1 = torch.tensor([[0.0, -2.0], [3.0, 0.0]])
T2 = torch.tensor([[0.0, 0.0], [2.0, -4.0]])


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------ hand-computed values


def test_linear_is_weighted_sum():
    # 0.5 * D1 + 0.25 * D2
    expected = torch.tensor([[0.25, -0.75], [2.0, -0.75]])
    assert torch.equal(linear([D1, D2], [0.5, 0.25]), expected)


def test_magnitude_prune_trims_then_sums():
    # 0.5 * T1 + 0.25 * T2
    expected = torch.tensor([[0.0, -1.0], [2.0, -1.0]])
    assert torch.equal(magnitude_prune([D1, D2], [0.5, 0.25], density=0.5), expected)


def test_magnitude_trim_keeps_at_least_one_entry_and_breaks_ties_by_index():
    # int(0.2 * 3) = 0, but mergekit-style trimming keeps max(1, k) = 1 entry: the -3.
    assert torch.equal(
        magnitude_prune([torch.tensor([0.1, -3.0, 2.0])], [1.0], density=0.2), torch.tensor([0.0, -3.0, 0.0])
    )
    # k = 2 of three entries tied at magnitude 1: the two lowest indices win.
    assert torch.equal(
        magnitude_prune([torch.tensor([1.0, -1.0, 1.0, 0.5])], [1.0], density=0.5),
        torch.tensor([1.0, -1.0, 0.0, 0.0]),
    )


def test_per_input_density():
    # D1 at density 0.25 keeps only the 3; D2 at density 1 is untouched. Sum: [[-1, 1], [5, -4]].
    out = magnitude_prune([D1, D2], [1.0, 1.0], density=[0.25, 1.0])
    assert torch.equal(out, torch.tensor([[-1.0, 1.0], [5.0, -4.0]]))


@pytest.mark.parametrize(
    ("normalize", "expected"),
    [
        # Weighted trimmed deltas: 1 * T1 = [[0, -2], [3, 0]], 3 * T2 = [[0, 0], [6, -12]].
        # Elected signs (sum >= 0 is +): [[+, -], [+, -]]. Agreeing entries: (0,0) none; (0,1) only
        # model 1 (-2); (1,0) both (3 + 6); (1,1) only model 2 (-12).
        ("weights", [[0.0, -2.0], [9.0 / 4.0, -12.0 / 3.0]]),  # divide by the agreeing weights
        ("count", [[0.0, -2.0], [9.0 / 2.0, -12.0]]),  # divide by the agreeing count (PEFT)
        ("none", [[0.0, -2.0], [9.0, -12.0]]),  # no division (mergekit normalize: false)
    ],
)
def test_ties_disjoint_merge(normalize, expected):
    out = ties([D1, D2], [1.0, 3.0], density=0.5, normalize=normalize)
    assert torch.equal(out, torch.tensor(expected))


def test_ties_normalize_accepts_mergekit_booleans():
    assert torch.equal(
        METHODS["ties"]([D1, D2], [1.0, 3.0], {"density": 0.5, "normalize": True}),
        torch.tensor([[0.0, -2.0], [2.25, -4.0]]),
    )


def test_ties_sign_methods():
    deltas = [torch.tensor([5.0]), torch.tensor([-1.0]), torch.tensor([-1.0])]
    # "sum": 5 - 1 - 1 = 3 > 0, so only the 5 agrees -> 5 / 1.
    assert torch.equal(ties(deltas, [1.0, 1.0, 1.0], density=1.0, sign_method="sum"), torch.tensor([5.0]))
    # "count": one positive against two negatives -> (-1 - 1) / 2.
    assert torch.equal(ties(deltas, [1.0, 1.0, 1.0], density=1.0, sign_method="count"), torch.tensor([-1.0]))


def test_ties_elects_sign_on_weighted_deltas_unlike_peft():
    deltas = [torch.tensor([1.0]), torch.tensor([-2.0])]
    # Weighted: 3 * 1 - 1 * 2 = 1 > 0, so the + entry wins: 3 / 3 = 1 (mergekit's election).
    assert torch.equal(ties(deltas, [3.0, 1.0], density=1.0), torch.tensor([1.0]))
    # PEFT elects on the unweighted deltas: 1 - 2 < 0, so it keeps -2 (weighted -2, one agreeing entry).
    with pytest.warns(UserWarning, match="no pruning"):
        peft_out = merge_utils.ties(deltas, torch.tensor([3.0, 1.0]), density=1.0)
    assert torch.equal(peft_out, torch.tensor([-2.0]))


def test_dare_at_full_density_is_its_deterministic_counterpart():
    # Nothing dropped, nothing rescaled: dare_linear = linear, dare_ties = ties without trimming.
    assert torch.equal(
        dare_linear([D1, D2], [0.5, 0.25], density=1.0, generator=gen()),
        torch.tensor([[0.25, -0.75], [2.0, -0.75]]),
    )
    # Sum D1 + D2 = [[0, -1], [5, -3.5]] -> signs [[+, -], [+, -]]; agreeing: (0,0) the 1 of D1,
    # (0,1) the -2 of D1, (1,0) 3 and 2 -> 5 / 2, (1,1) the -4 of D2.
    assert torch.equal(
        dare_ties([D1, D2], [1.0, 1.0], density=1.0, generator=gen()),
        torch.tensor([[1.0, -2.0], [2.5, -4.0]]),
    )


def test_dare_drop_mask_comes_from_the_generator():
    # Documented contract: one float32 Bernoulli(density) draw per input, in input order, then / density.
    reference = gen(7)
    mask1 = torch.bernoulli(torch.full((2, 2), 0.5), generator=reference)
    mask2 = torch.bernoulli(torch.full((2, 2), 0.5), generator=reference)
    expected = 0.5 * (D1 * mask1 / 0.5) + 0.25 * (D2 * mask2 / 0.5)
    assert torch.equal(dare_linear([D1, D2], [0.5, 0.25], density=0.5, generator=gen(7)), expected)
    assert not torch.equal(
        dare_linear([D1, D2], [0.5, 0.25], density=0.5, generator=gen(8)),
        dare_linear([D1, D2], [0.5, 0.25], density=0.5, generator=gen(7)),
    )


def test_dare_is_unbiased_in_expectation():
    ones = torch.ones(200, 200)
    out = dare_linear([ones], [1.0], density=0.3, generator=gen(1))
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.3) < 0.01
    assert torch.allclose(out[kept], torch.full_like(out[kept], 1 / 0.3))
    assert abs(out.mean().item() - 1.0) < 0.03


# ------------------------------------------------------------------------------------------- LoRA helpers


def test_lora_concat_is_exact():
    a1, b1 = torch.tensor([[1.0, 2.0]]), torch.tensor([[1.0], [0.0], [2.0]])  # rank 1
    a2, b2 = (
        torch.tensor([[0.0, 1.0], [1.0, -1.0]]),
        torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]),
    )  # rank 2
    # lambda * scale = 0.5 * 2 = 1 for adapter 1 and 1 * 0.5 = 0.5 for adapter 2; it all goes on A.
    a_cat, b_cat = lora_concat([a1, a2], [b1, b2], scales=[2.0, 0.5], lambdas=[0.5, 1.0])
    assert torch.equal(a_cat, torch.tensor([[1.0, 2.0], [0.0, 0.5], [0.5, -0.5]]))
    assert torch.equal(b_cat, torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0], [2.0, 1.0, 1.0]]))
    # 1 * B1 A1 + 0.5 * B2 A2 = [[1, 2], [0, 0], [2, 4]] + 0.5 * [[0, 1], [1, -1], [1, 0]]
    assert torch.equal(b_cat @ a_cat, torch.tensor([[1.0, 2.5], [0.5, -0.5], [2.5, 4.0]]))


def test_lora_concat_matches_product_sum_on_random_factors():
    g = gen(2)
    As = [torch.randn(r, 24, generator=g) for r in (4, 8, 2)]
    Bs = [torch.randn(16, r, generator=g) for r in (4, 8, 2)]
    scales, lambdas = [2.0, 0.5, 4.0], [0.2, 0.3, 0.5]
    a_cat, b_cat = lora_concat(As, Bs, scales, lambdas)
    assert a_cat.shape == (14, 24) and b_cat.shape == (16, 14)
    expected = sum(
        lam * s * (b.double() @ a.double()) for a, b, s, lam in zip(As, Bs, scales, lambdas, strict=True)
    )
    assert torch.allclose((b_cat @ a_cat).double(), expected, atol=1e-5)


def test_factorwise_mean_is_not_the_mean_of_products():
    a1, b1 = torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0], [0.0]])
    a2, b2 = torch.tensor([[0.0, 1.0]]), torch.tensor([[0.0], [1.0]])
    a, b = factorwise_mean([a1, a2], [b1, b2], [0.5, 0.5])
    assert torch.equal(a, torch.tensor([[0.5, 0.5]]))
    assert torch.equal(b, torch.tensor([[0.5], [0.5]]))
    # (sum B)(sum A) has the cross terms B1 A2 and B2 A1: [[.25, .25], [.25, .25]], while the mean of
    # the products is 0.5 * diag(1, 0) + 0.5 * diag(0, 1) = diag(0.5, 0.5).
    assert torch.equal(b @ a, torch.full((2, 2), 0.25))
    assert torch.equal(linear([b1 @ a1, b2 @ a2], [0.5, 0.5]), torch.tensor([[0.5, 0.0], [0.0, 0.5]]))


def test_lora_helpers_reject_bad_factors():
    with pytest.raises(CompositionError):
        lora_concat([torch.ones(2, 3)], [torch.ones(4, 3)], [1.0], [1.0])  # B's rank 3 != A's rank 2
    with pytest.raises(CompositionError):
        lora_concat([torch.ones(2, 3)], [torch.ones(4, 2)], [0.0], [1.0])  # scale must be positive
    with pytest.raises(CompositionError):
        factorwise_mean(
            [torch.ones(2, 3), torch.ones(1, 3)], [torch.ones(4, 2), torch.ones(4, 1)], [1.0, 1.0]
        )


# ---------------------------------------------------------------------------------- dtype, device, purity

ALL_CALLS = [
    ("linear", {}),
    ("ties", {"density": 0.5}),
    ("dare_linear", {"density": 0.5}),
    ("dare_ties", {"density": 0.5}),
    ("magnitude_prune", {"density": 0.5}),
]


@pytest.mark.parametrize(("name", "params"), ALL_CALLS)
def test_inputs_are_not_modified_and_output_is_fresh(name, params):
    deltas = [D1.clone(), D2.clone()]
    out = METHODS[name](deltas, [1.0, 1.0], params, generator=gen())
    assert torch.equal(deltas[0], D1) and torch.equal(deltas[1], D2)
    out.add_(100.0)
    assert torch.equal(deltas[0], D1) and torch.equal(deltas[1], D2)


@pytest.mark.parametrize(("name", "params"), ALL_CALLS)
def test_bf16_inputs_are_merged_in_float32_and_returned_as_bf16(name, params):
    g = gen(3)
    deltas = [torch.randn(8, 8, generator=g).bfloat16() for _ in range(3)]
    out = METHODS[name](deltas, [0.2, 0.3, 0.5], params, generator=gen(4))
    ref = METHODS[name]([d.float() for d in deltas], [0.2, 0.3, 0.5], params, generator=gen(4))
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, ref.bfloat16())  # one rounding at the end, nothing accumulated in bf16


def test_float64_inputs_stay_float64():
    third = torch.tensor([1.0], dtype=torch.float64)
    out = linear([third, third, third], [1 / 3, 1 / 3, 1 / 3])
    assert out.dtype == torch.float64
    assert out.item() == pytest.approx(1.0, abs=1e-15)


def test_meta_device_inputs_keep_their_device():
    deltas = [torch.empty(4, 4, device="meta") for _ in range(2)]
    assert linear(deltas, [0.5, 0.5]).device.type == "meta"


# ------------------------------------------------------------------------------- trimming and streaming


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("chunk", [5, 64, 1000])
def test_magnitude_trims_keep_the_top_k_with_ties_by_lowest_index(dtype, chunk):
    # Small integers tie a lot, also across chunk boundaries; the reference is a stable sort by -|D|.
    g = gen(7)
    deltas = torch.randint(-4, 5, (3, 200), generator=g).to(dtype) * 0.125
    densities = [0.3, 0.5, 0.01]
    spans = [(s, min(s + chunk, 200)) for s in range(0, 200, chunk)]
    trims = magnitude_trims(lambda: (deltas[:, a:b].abs() for a, b in spans), 200, densities)
    for delta, density, trim in zip(deltas, densities, trims, strict=True):
        k = max(1, int(density * 200))
        expected = torch.zeros(200, dtype=torch.bool)
        expected[torch.sort(-delta.abs(), stable=True).indices[:k]] = True
        kept = torch.cat([trim.apply_(delta[a:b].clone(), a) for a, b in spans]) != 0
        assert torch.equal(kept, expected & (delta != 0))
        above, tied = delta.abs() > trim.threshold, delta.abs() == trim.threshold
        assert int(above.sum()) + int(tied[: trim.last_tie + 1].sum()) == k


def test_magnitude_trims_keep_everything_at_full_density_or_for_a_single_entry():
    assert magnitude_trims(lambda: [torch.ones(2, 1)], 1, [0.5, 1.0]) == [None, None]


@pytest.mark.parametrize(
    ("name", "params"),
    [
        *ALL_CALLS,
        ("ties", {"density": [0.3, 1.0, 0.7], "normalize": "count", "sign_method": "count"}),
        ("ties", {"density": 0.2, "normalize": "none"}),
    ],
)
def test_merge_chunks_equals_the_in_memory_operator(name, params):
    g = gen(8)
    deltas = [torch.randint(-3, 4, (9, 11), generator=g) * 0.25 for _ in range(3)]
    stacked = torch.stack(deltas).view(3, -1)
    chunks = merge_chunks(name, lambda a, b: stacked[:, a:b].clone(), 99, [0.2, 0.5, 0.3], params, gen(1), chunk=10)
    expected = METHODS[name](deltas, [0.2, 0.5, 0.3], params, gen(1))
    assert torch.equal(torch.cat(list(chunks)), expected.flatten())


# ------------------------------------------------------------------------------------ registry, validation


def test_registry_declares_parameters():
    assert set(METHODS) == {"linear", "ties", "dare_linear", "dare_ties", "magnitude_prune", "factorwise_mean"}
    assert METHODS["linear"].parameters == ("normalize",)
    assert METHODS["ties"].required == ("density",)
    assert dict(METHODS["ties"].optional) == {"sign_method": "sum", "normalize": "weights"}
    assert METHODS["magnitude_prune"].parameters == ("density", "normalize")
    assert METHODS["factorwise_mean"].parameters == ()
    assert METHODS["dare_linear"].random and not METHODS["ties"].random


def test_methods_are_compositions_of_the_three_parts():
    parts = {name: (m.sparsify, m.consensus, m.normalize) for name, m in METHODS.items() if m.space == "deltas"}
    assert parts == {
        "linear": ("none", "none", "none"),
        "ties": ("magnitude", "ties", "weights"),
        "dare_linear": ("dare", "none", "none"),
        "dare_ties": ("dare", "ties", "weights"),
        "magnitude_prune": ("magnitude", "none", "none"),
    }


def test_normalise_without_election_divides_by_all_weights_as_mergekit():
    # Task arithmetic with normalize: (0.5 * D1 + 0.25 * D2) / (0.5 + 0.25); by count: / 2.
    weighted = torch.tensor([[0.25, -0.75], [2.0, -0.75]])
    assert torch.equal(METHODS["linear"]([D1, D2], [0.5, 0.25], {"normalize": True}), weighted / 0.75)
    assert torch.equal(METHODS["linear"]([D1, D2], [0.5, 0.25], {"normalize": "count"}), weighted / 2)


def test_factorwise_mean_is_not_callable_on_deltas():
    with pytest.raises(CompositionError, match="averages LoRA factors"):
        METHODS["factorwise_mean"]([D1], [1.0])


def test_validate_fills_defaults_and_canonicalises():
    assert validate_parameters("ties", {"density": 0.3}) == {
        "density": 0.3,
        "sign_method": "sum",
        "normalize": "weights",
    }
    assert validate_parameters("dare_ties", {"density": [0.5, 1], "normalize": False}, lambdas=[1, 2]) == {
        "density": (0.5, 1.0),
        "sign_method": "sum",
        "normalize": "none",
    }
    assert validate_parameters("linear", {}, lambdas=[0.0, 1.0]) == {"normalize": "none"}
    assert validate_parameters("factorwise_mean", {}) == {}


@pytest.mark.parametrize(
    ("name", "params", "lambdas", "match"),
    [
        ("slerp", {}, None, "unknown merge method 'slerp'"),
        ("linear", {"density": 0.5}, None, "no parameter 'density'"),
        ("ties", {"density": 0.5, "weight": 1}, None, "no parameter 'weight'"),
        ("factorwise_mean", {"normalize": True}, None, "no parameter 'normalize'"),
        ("ties", {}, None, "needs parameter 'density'"),
        ("ties", {"density": 0.0}, None, "density"),
        ("ties", {"density": 1.5}, None, "density"),
        ("ties", {"density": math.nan}, None, "density"),
        ("ties", {"density": True}, None, "density"),
        ("ties", {"density": "0.5"}, None, "density"),
        ("ties", {"density": [0.5, 0.5]}, [1.0, 1.0, 1.0], "density"),
        ("ties", {"density": 0.5, "sign_method": "total"}, None, "sign_method"),
        ("ties", {"density": 0.5, "normalize": "mean"}, None, "normalize"),
        ("linear", {}, [1.0, -0.5], "lambda"),
        ("linear", {}, [1.0, math.inf], "lambda"),
        ("linear", {}, [math.nan], "lambda"),
        ("linear", {}, [True], "lambda"),
        ("linear", {}, [], "at least one"),
    ],
)
def test_validate_rejects(name, params, lambdas, match):
    with pytest.raises(CompositionError, match=match) as info:
        validate_parameters(name, params, lambdas=lambdas)
    assert "\n" not in str(info.value)


def test_operators_reject_bad_inputs():
    with pytest.raises(CompositionError, match="lambda"):
        linear([D1, D2], [1.0])
    with pytest.raises(CompositionError, match="shape"):
        linear([D1, torch.ones(3)], [1.0, 1.0])
    with pytest.raises(CompositionError, match="floating"):
        linear([torch.ones(2, dtype=torch.int64)], [1.0])
    with pytest.raises(CompositionError, match="at least one"):
        linear([], [])
    with pytest.raises(CompositionError, match="density"):
        ties([D1], [1.0], density=0.0)
    with pytest.raises(CompositionError, match=r"torch\.Generator"):
        METHODS["dare_linear"]([D1], [1.0], {"density": 0.5})


def test_registry_call_equals_direct_call():
    assert torch.equal(
        METHODS["dare_ties"]([D1, D2], [0.4, 0.6], {"density": 0.5}, generator=gen(5)),
        dare_ties([D1, D2], [0.4, 0.6], density=0.5, generator=gen(5)),
    )


# ------------------------------------------------------------------------- parity with peft.utils.merge_utils
# Operator-level: the same tensors into PEFT's functions and ours, with the settings under which the two
# definitions coincide (see the module docstring of mmcompose.compose.operators for where they differ).


def _random_deltas(seed: int, n: int = 3, shape: tuple[int, ...] = (16, 12)) -> list[torch.Tensor]:
    g = gen(seed)
    return [torch.randn(*shape, generator=g) for _ in range(n)]


WEIGHTS = [0.2, 0.5, 0.3]


def test_peft_magnitude_prune_parity():
    # Random floats have no magnitude ties and int(0.3 * 192) >= 1, so both keep the same entries.
    deltas = _random_deltas(10)
    peft = merge_utils.magnitude_prune(deltas, torch.tensor(WEIGHTS), density=0.3)
    assert torch.allclose(magnitude_prune(deltas, WEIGHTS, density=0.3), peft, atol=1e-6)


@pytest.mark.parametrize(
    ("peft_sign", "our_sign", "weights"),
    [
        # Frequency election counts signs, which positive weights do not change: any weights compare.
        ("frequency", "count", WEIGHTS),
        # PEFT elects on the unweighted sum; ours on the weighted one: they coincide for equal weights.
        ("total", "sum", [0.4, 0.4, 0.4]),
    ],
)
def test_peft_ties_parity(peft_sign, our_sign, weights):
    deltas = _random_deltas(11)
    peft = merge_utils.ties(deltas, torch.tensor(weights), density=0.4, majority_sign_method=peft_sign)
    ours = ties(deltas, weights, density=0.4, sign_method=our_sign, normalize="count")
    assert torch.allclose(ours, peft, atol=1e-6)


def test_peft_dare_parity():
    # PEFT draws its masks from the global RNG in input order with float32 probabilities, exactly what
    # our operators draw from their generator; seeding both identically gives the same masks.
    deltas = _random_deltas(12)
    torch.manual_seed(99)
    peft = merge_utils.dare_linear(deltas, torch.tensor(WEIGHTS), density=0.6)
    assert torch.allclose(dare_linear(deltas, WEIGHTS, density=0.6, generator=gen(99)), peft, atol=1e-6)
    torch.manual_seed(98)
    peft = merge_utils.dare_ties(deltas, torch.tensor(WEIGHTS), density=0.6, majority_sign_method="frequency")
    ours = dare_ties(deltas, WEIGHTS, density=0.6, generator=gen(98), sign_method="count", normalize="count")
    assert torch.allclose(ours, peft, atol=1e-6)


# ---------------------------------------------------------------- parity with PEFT's add_weighted_adapter
# PEFT 0.21.2 `LoraModel.add_weighted_adapter` computes, per LoRA layer:
# * "cat": A_cat = cat(w_m * scaling_m * A_m), B_cat = cat(B_m), new alpha = new rank (scale 1): exact.
# * "svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd": its merge_utils function
#   on the delta products get_delta_weight(m) = scaling_m * B_m @ A_m, then a rank-`svd_rank` truncated SVD
#   (new scale 1). With svd_rank = 32 >= the rank of every 32 x n delta, the SVD reconstructs the merged
#   delta up to float32 round-off, so comparing delta products against our operators is fair.
# * "linear": factor-wise, A = sum sqrt(w_m * scaling_m) A_m and B = sum sqrt(w_m * scaling_m) B_m. This is
#   our legacy factorwise_mean with lambda_m = sqrt(w_m * scaling_m); compared as such.
# * "ties", "dare_linear", "dare_ties", "magnitude_prune" (without _svd): the merge_utils functions applied
#   to the A factors and to the B factors separately. Not comparable to any delta-space operator (trimming or
#   sign-electing factors has no counterpart on products); feeding factors to our operators would only
#   repeat the operator-level parity above, so these modes are not compared.


ADAPTERS = ["m0", "m1", "m2"]


@pytest.fixture(scope="module")
def lora_model():
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=64,
        max_position_embeddings=64,
    )
    targets = ["q_proj", "v_proj", "down_proj"]  # down_proj is 32 x 64: a non-square delta
    model = peft.get_peft_model(
        LlamaForCausalLM(config),
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets),
        adapter_name="m0",
    )
    model.add_adapter("m1", peft.LoraConfig(r=4, lora_alpha=4, target_modules=targets))
    model.add_adapter("m2", peft.LoraConfig(r=4, lora_alpha=16, target_modules=targets))
    g = gen(1)
    with torch.no_grad():
        for layer in _lora_layers(model):
            for name in ADAPTERS:
                layer.lora_A[name].weight.copy_(
                    0.3 * torch.randn(layer.lora_A[name].weight.shape, generator=g)
                )
                layer.lora_B[name].weight.copy_(
                    0.3 * torch.randn(layer.lora_B[name].weight.shape, generator=g)
                )
    return model


def _lora_layers(model) -> list[LoraLayer]:
    return [module for _, module in model.named_modules() if isinstance(module, LoraLayer)]


def _deltas(layer: LoraLayer) -> list[torch.Tensor]:
    return [layer.get_delta_weight(name).detach() for name in ADAPTERS]


def _merged_delta(layer: LoraLayer, name: str) -> torch.Tensor:
    return layer.get_delta_weight(name).detach()


def test_peft_cat_parity(lora_model):
    lora_model.add_weighted_adapter(ADAPTERS, WEIGHTS, "cat", combination_type="cat")
    for layer in _lora_layers(lora_model):
        As = [layer.lora_A[n].weight.detach() for n in ADAPTERS]
        Bs = [layer.lora_B[n].weight.detach() for n in ADAPTERS]
        a_cat, b_cat = lora_concat(As, Bs, [layer.scaling[n] for n in ADAPTERS], WEIGHTS)
        assert layer.scaling["cat"] == 1.0
        assert torch.allclose(layer.lora_A["cat"].weight, a_cat, rtol=1e-6, atol=0)
        assert torch.equal(layer.lora_B["cat"].weight, b_cat)
        assert torch.allclose(b_cat @ a_cat, linear(_deltas(layer), WEIGHTS), atol=1e-5)


def test_peft_linear_is_factorwise(lora_model):
    lora_model.add_weighted_adapter(ADAPTERS, WEIGHTS, "fw", combination_type="linear")
    for layer in _lora_layers(lora_model):
        lambdas = [math.sqrt(w * layer.scaling[n]) for w, n in zip(WEIGHTS, ADAPTERS, strict=True)]
        a, b = factorwise_mean(
            [layer.lora_A[n].weight.detach() for n in ADAPTERS],
            [layer.lora_B[n].weight.detach() for n in ADAPTERS],
            lambdas,
        )
        assert torch.allclose(layer.lora_A["fw"].weight, a, atol=1e-6)
        assert torch.allclose(layer.lora_B["fw"].weight, b, atol=1e-6)
        # ... and it is not the merge of the deltas.
        assert not torch.allclose(_merged_delta(layer, "fw"), linear(_deltas(layer), WEIGHTS), atol=1e-3)


@pytest.mark.parametrize(
    ("mode", "ours"),
    [
        ("svd", lambda d: linear(d, WEIGHTS)),
        ("magnitude_prune_svd", lambda d: magnitude_prune(d, WEIGHTS, density=0.3)),
        # PEFT's ties = unweighted election + division by the agreeing count; with "frequency" election
        # and positive weights that is our ties with sign_method="count", normalize="count".
        ("ties_svd", lambda d: ties(d, WEIGHTS, density=0.3, sign_method="count", normalize="count")),
    ],
)
def test_peft_svd_parity(lora_model, mode, ours):
    lora_model.add_weighted_adapter(
        ADAPTERS,
        WEIGHTS,
        mode,
        combination_type=mode,
        svd_rank=32,
        density=0.3,
        majority_sign_method="frequency",
    )
    for layer in _lora_layers(lora_model):
        assert torch.allclose(_merged_delta(layer, mode), ours(_deltas(layer)), atol=1e-5)


@pytest.mark.parametrize("mode", ["dare_linear_svd", "dare_ties_svd"])
def test_peft_dare_svd_parity(lora_model, mode):
    # PEFT draws DARE masks from the global RNG, after creating the new adapter's layers (whose init also
    # consumes the global RNG). To start our generator where PEFT's first mask draw starts, run the
    # RNG-free "svd" mode (same new rank, same layers to create) from the same seed and read the state.
    torch.manual_seed(1234)
    lora_model.add_weighted_adapter(ADAPTERS, WEIGHTS, f"probe_{mode}", combination_type="svd", svd_rank=32)
    generator = torch.Generator()
    generator.set_state(torch.get_rng_state())
    torch.manual_seed(1234)
    lora_model.add_weighted_adapter(
        ADAPTERS,
        WEIGHTS,
        mode,
        combination_type=mode,
        svd_rank=32,
        density=0.5,
        majority_sign_method="frequency",
    )
    # Same layer order and adapter order as PEFT's loop, so the same draws land on the same entries.
    for layer in _lora_layers(lora_model):
        if mode == "dare_linear_svd":
            expected = dare_linear(_deltas(layer), WEIGHTS, density=0.5, generator=generator)
        else:
            expected = dare_ties(
                _deltas(layer),
                WEIGHTS,
                density=0.5,
                generator=generator,
                sign_method="count",
                normalize="count",
            )
        assert torch.allclose(_merged_delta(layer, mode), expected, atol=1e-5)
