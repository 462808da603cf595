"""Quantized base weights (bitsandbytes 8-bit / 4-bit) under routed layers: deltas in 16-bit beside the packed
weights, the base always called as a module, nothing folded into it, and any other `nn.Linear` subclass
refused in one line. The bitsandbytes tests run on the CPU backend of bitsandbytes >= 0.50 and are skipped,
with the reason, where it cannot run."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from mmcompose.checkpoint import load_checkpoint, save_checkpoint
from mmcompose.cli import app
from mmcompose.errors import MMComposeError
from mmcompose.model import MultimodalLLM
from mmcompose.model import quantize as quantize_module
from mmcompose.model.quantize import check_quantize, routable_linear
from mmcompose.model.routed import RouteContext, RoutedLinear, wrap_linears
from tests.conftest import make_base
from tests.model.helpers import randomize_deltas, tiny_modality
from tests.serve.conftest import LIMITS, start_server

KINDS = ("8bit", "4bit")
# Relative error of the logits (Frobenius norm) of the quantized model against the same model unquantized, both
# bfloat16, on a 2-layer LLaMA of width 64 with random weights. Measured over 4 seeds, with and without deltas:
# 8-bit 0.010-0.011, 4-bit (NF4) 0.100-0.109. Random weights have no structure for quantization to keep, so these
# are larger than on a trained model; the bounds leave about 40% margin.
BASE_ERROR = {"8bit": 0.015, "4bit": 0.15}


def _bitsandbytes_reason() -> str | None:
    try:
        for kind in KINDS:
            check_quantize(kind, torch.bfloat16, "cpu")
    except MMComposeError as error:
        return str(error)
    return None


SKIP_REASON = _bitsandbytes_reason()
needs_bitsandbytes = pytest.mark.skipif(SKIP_REASON is not None, reason=f"bitsandbytes on CPU: {SKIP_REASON}")


# --- refusal of what a routed layer cannot handle (no bitsandbytes needed) ----------------------------------------
class PackedLinear(nn.Linear):
    """A stand-in for a quantizer's linear: int8 storage with a per-row scale, dequantized in its own forward."""

    def __init__(self, dense: nn.Linear) -> None:
        super().__init__(dense.in_features, dense.out_features, bias=False)
        scale = dense.weight.detach().abs().amax(dim=1, keepdim=True) / 127
        self.weight = nn.Parameter(torch.round(dense.weight.detach() / scale).to(torch.int8), requires_grad=False)
        self.register_buffer("scale", scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight.to(x.dtype) * self.scale)


class Block(nn.Module):
    def __init__(self, q_proj: nn.Linear) -> None:
        super().__init__()
        self.q_proj, self.k_proj = q_proj, nn.Linear(8, 8)


def test_an_unknown_linear_subclass_is_refused_in_one_line_and_nothing_is_wrapped() -> None:
    model = nn.Sequential(Block(nn.Linear(8, 8)), Block(PackedLinear(nn.Linear(8, 8))))
    with pytest.raises(MMComposeError) as error:
        wrap_linears(model, ("q_proj", "k_proj"), RouteContext({0: "language"}))
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("1.q_proj: ") and "PackedLinear" in message
    # refused before any layer is replaced: the model is as it was
    assert not any(isinstance(module, RoutedLinear) for module in model.modules())


def test_a_plain_linear_with_a_non_float_weight_is_refused() -> None:
    layer = nn.Linear(8, 8)
    layer.weight = nn.Parameter(torch.zeros(8, 8, dtype=torch.int8), requires_grad=False)
    with pytest.raises(MMComposeError, match=r"layers\.0\.q_proj: .*weight of type .*dtype torch\.int8"):
        routable_linear(layer, "layers.0.q_proj")
    with pytest.raises(MMComposeError, match="PackedLinear"):
        RoutedLinear(PackedLinear(nn.Linear(8, 8)), RouteContext({}))


def test_a_plain_linear_is_routable_on_any_device() -> None:
    assert routable_linear(nn.Linear(4, 4)) is False
    assert routable_linear(nn.Linear(4, 4, device="meta", dtype=torch.bfloat16)) is False


# --- bad --quantize input -------------------------------------------------------------------------------------------
def test_an_unknown_kind_and_float32_are_refused_naming_the_flags() -> None:
    with pytest.raises(MMComposeError, match=r"^--quantize '3bit': expected one of 8bit, 4bit$"):
        check_quantize("3bit")
    with pytest.raises(MMComposeError, match=r"^--quantize 4bit with --dtype float32: .*16-bit"):
        check_quantize("4bit", torch.float32)
    with pytest.raises(MMComposeError, match=r"^--quantize 8bit with --dtype float32: "):
        check_quantize("8bit", "float32")


@needs_bitsandbytes
def test_the_compute_dtype_is_bfloat16_unless_float16_is_asked() -> None:
    assert check_quantize("4bit") == check_quantize("4bit", "auto") == torch.bfloat16
    assert check_quantize("8bit", "float16", "cpu") == check_quantize("8bit", torch.float16) == torch.float16


def test_missing_bitsandbytes_is_one_line_naming_the_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` then raises ImportError
    with pytest.raises(MMComposeError, match=r"^--quantize 8bit: needs bitsandbytes, which is not installed"):
        check_quantize("8bit")


@needs_bitsandbytes
def test_a_kind_bitsandbytes_cannot_run_here_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    import bitsandbytes as bnb

    def no_kernel(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("no 4-bit kernel for this device\nsecond line")

    monkeypatch.setattr(bnb.nn.Linear4bit, "forward", no_kernel)
    quantize_module._probe.cache_clear()
    try:
        with pytest.raises(MMComposeError) as error:
            check_quantize("4bit", torch.bfloat16, "cpu")
    finally:
        quantize_module._probe.cache_clear()
    assert str(error.value) == (f"--quantize 4bit: bitsandbytes {bnb.__version__} cannot run 4bit layers on cpu "
                                f"(no 4-bit kernel for this device)")


def test_cli_refuses_a_bad_quantize_before_loading(composed_checkpoint: Path) -> None:
    result = CliRunner().invoke(app, ["chat", "--model", str(composed_checkpoint), "--quantize", "2bit", "hi"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == ["error: --quantize '2bit': expected one of 8bit, 4bit"]


@needs_bitsandbytes
def test_cli_refuses_float32_and_a_device_map_with_quantize(composed_checkpoint: Path) -> None:
    for extra, expected in ((["--dtype", "float32"], "error: --quantize 4bit with --dtype float32: "),
                            (["--device-map", "auto"], "error: --quantize 4bit with --device-map: not supported")):
        result = CliRunner().invoke(app, ["chat", "--model", str(composed_checkpoint), "--device", "cpu",
                                          "--quantize", "4bit", *extra, "hi"])
        assert result.exit_code == 2
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(expected), result.output


# --- the real thing: bitsandbytes layers on the CPU ------------------------------------------------------------------
def _quantized_linear(kind: str, dense: nn.Linear) -> nn.Linear:
    import bitsandbytes as bnb

    if kind == "8bit":
        layer = bnb.nn.Linear8bitLt(dense.in_features, dense.out_features, bias=True, has_fp16_weights=False)
        layer.weight = bnb.nn.Int8Params(dense.weight.detach().clone(), requires_grad=False, has_fp16_weights=False)
    else:
        layer = bnb.nn.Linear4bit(dense.in_features, dense.out_features, bias=True, compute_dtype=torch.bfloat16,
                                  quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(dense.weight.detach().clone(), requires_grad=False, quant_type="nf4")
    layer.bias = nn.Parameter(dense.bias.detach().to(torch.bfloat16), requires_grad=False)
    return layer.to("cpu").eval()  # moving to a device is what quantizes


@needs_bitsandbytes
@pytest.mark.parametrize("kind", KINDS)
def test_routed_layer_over_a_packed_weight_adds_16_bit_deltas_per_token(kind: str) -> None:
    torch.manual_seed(0)
    base = _quantized_linear(kind, nn.Linear(64, 32))
    packed_dtype = base.weight.dtype
    context = RouteContext({0: "language", 1: "image"})
    layer = RoutedLinear(base, context, compute_dtype=torch.bfloat16)
    assert layer.packed
    for name in ("language", "image"):
        delta = layer.add_delta(name, "lora", rank=4, alpha=4.0)
        with torch.no_grad():
            delta.lora_B.copy_(torch.randn_like(delta.lora_B))
        assert delta.lora_A.dtype == delta.lora_B.dtype == torch.bfloat16
    assert base.weight.dtype == packed_dtype in (torch.int8, torch.uint8)
    x = torch.randn(2, 5, 64, dtype=torch.bfloat16)
    routes = torch.tensor([[0, 1, 1, 0, 0], [1, 0, 0, 1, 0]])
    with torch.no_grad():
        with context.route(routes):
            got = layer(x)
        base_out = base(x)  # the quantized layer's own forward: what the routed layer must add the deltas to
        expected = torch.stack([torch.stack([
            base_out[row, t] + layer.deltas["image" if routes[row, t] else "language"](x[row, t])
            for t in range(5)]) for row in range(2)])
        with context.route(None):
            text_only = layer(x)
    torch.testing.assert_close(got, expected, rtol=0.02, atol=0.02)
    torch.testing.assert_close(text_only, base_out + layer.deltas["language"](x), rtol=0.02, atol=0.02)
    # the deltas matter at this tolerance: without them the output is far off
    assert (got - base_out).abs().max() > 0.5


@needs_bitsandbytes
@pytest.mark.parametrize("kind", KINDS)
def test_deltas_over_a_packed_weight_train_as_over_its_dequantized_one(kind: str) -> None:
    """QLoRA: gradients reach the 16-bit deltas through the quantized matmul, as they would through a plain
    layer holding the dequantized weight (read off the quantized layer itself: `base(I) - bias = W^T`)."""
    torch.manual_seed(0)
    base = _quantized_linear(kind, nn.Linear(64, 32))
    with torch.no_grad():
        dense_weight = (base(torch.eye(64, dtype=torch.bfloat16)) - base.bias).T.float()
    dense = nn.Linear(64, 32)
    with torch.no_grad():
        dense.weight.copy_(dense_weight)
        dense.bias.copy_(base.bias.float())
    x = torch.randn(2, 5, 64)
    routes = torch.tensor([[0, 1, 1, 0, 0], [1, 0, 0, 1, 0]])
    gradients = []
    for layer_base, dtype in ((base.train(), torch.bfloat16), (dense, torch.float32)):
        generator = torch.Generator().manual_seed(1)
        context = RouteContext({0: "language", 1: "image", 2: "audio"})
        layer = RoutedLinear(layer_base, context, compute_dtype=dtype)
        for name in ("language", "image", "audio"):
            delta = layer.add_delta(name, "lora", rank=4, alpha=4.0)
            with torch.no_grad():
                for parameter in (delta.lora_A, delta.lora_B):
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
        with context.route(routes):
            layer(x.to(dtype)).float().pow(2).sum().backward()
        gradients.append({name: delta.lora_A.grad for name, delta in layer.deltas.items()})
    packed, reference = gradients
    assert packed["audio"] is None  # no audio token: no gradient
    for name in ("language", "image"):
        assert packed[name].dtype == torch.bfloat16
        torch.testing.assert_close(packed[name].float(), reference[name], rtol=0.05, atol=0.05 * float(
            reference[name].abs().max()))


@needs_bitsandbytes
@pytest.mark.parametrize("kind", KINDS)
def test_folding_a_packed_layer_is_refused(kind: str) -> None:
    layer = RoutedLinear(_quantized_linear(kind, nn.Linear(64, 32)), RouteContext({0: "language"}))
    layer.add_delta("language", "lora", rank=2, alpha=2.0)
    with pytest.raises(MMComposeError, match=r"cannot fold a delta into .*quantized"):
        layer.fold("language")


@needs_bitsandbytes
def test_a_4bit_width_the_cpu_kernel_cannot_pack_is_one_line(llama_base: Path) -> None:
    from bitsandbytes.functional import has_avx512bf16

    if not has_avx512bf16():
        pytest.skip("bitsandbytes uses its fused CPU 4-bit kernel (the one with the width limit) only with AVX512-BF16")
    # width 32: half a block of 64
    with pytest.raises(MMComposeError, match=r"^model\.layers\.0\.self_attn\.q_proj: bitsandbytes' CPU 4-bit "
                                             r"kernel needs input widths that are multiples of 64, this layer's is 32"):
        MultimodalLLM.from_base(llama_base, [tiny_modality("image")], strategy="decoupled", quantize="4bit")


@pytest.fixture(scope="module")
def base64(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Width 64: bitsandbytes' CPU 4-bit kernel (AVX512-BF16) packs blocks of 64 inputs, so narrower layers fail."""
    return make_base(tmp_path_factory.mktemp("llama-64"), "llama", hidden=64)


@pytest.fixture(scope="module")
def composed_checkpoint(base64: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A decoupled image+audio model (language, image and audio deltas), saved in float32."""
    model = MultimodalLLM.from_base(base64, [tiny_modality("image"), tiny_modality("audio")],
                                    strategy="decoupled", rank=4, alpha=4.0)
    # scale 0.05 at rank 4, alpha 4: the deltas change the logits by ~25% (relative norm), well above the
    # quantization error, so a delta dropped or applied twice fails the comparison below
    randomize_deltas(model, scale=0.05)
    return save_checkpoint(model, tmp_path_factory.mktemp("quantize") / "composed")


UNROUTED = 99  # a route id no delta serves: the base weights alone


def _logits(model: MultimodalLLM, ids: torch.Tensor, routes: torch.Tensor | None, deltas: bool = True) -> torch.Tensor:
    if not deltas:
        routes = torch.full_like(ids, UNROUTED)
    with torch.no_grad(), model.routing.route(routes):
        return model.llm(input_ids=ids).logits.float()


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@needs_bitsandbytes
@pytest.mark.parametrize("kind", KINDS)
def test_quantized_composed_model_is_close_to_the_unquantized_one(kind: str, composed_checkpoint: Path) -> None:
    reference = load_checkpoint(composed_checkpoint, dtype=torch.bfloat16)
    quantized = load_checkpoint(composed_checkpoint, quantize=kind)  # bfloat16 by default
    layer = next(iter(quantized.routed.values()))
    assert layer.packed and quantized.quantized and not reference.quantized
    assert layer.base.weight.dtype in (torch.int8, torch.uint8)
    assert {delta.lora_A.dtype for layer in quantized.routed.values() for delta in layer.deltas.values()} == \
        {torch.bfloat16}
    assert {p.dtype for p in quantized.branches.parameters()} == {torch.bfloat16}
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 300, (2, 24), generator=generator)
    routes = torch.randint(0, 3, (2, 24), generator=generator)
    expected = _logits(reference, ids, routes)
    got = _logits(quantized, ids, routes)
    bare = _logits(quantized, ids, routes, deltas=False)
    base_error = _relative(bare, _logits(reference, ids, routes, deltas=False))
    assert base_error < BASE_ERROR[kind]
    # the deltas add no error of their own: the composed model is as close as the bare quantized base is
    assert _relative(got, expected) < 1.25 * base_error
    # and the bound is tight enough to see a dropped delta
    assert _relative(bare, expected) > 1.25 * base_error


@needs_bitsandbytes
@pytest.mark.parametrize("kind", KINDS)
def test_fold_keeps_the_text_delta_unfused_and_leaves_packed_weights_alone(kind: str,
                                                                           composed_checkpoint: Path) -> None:
    model = load_checkpoint(composed_checkpoint, quantize=kind).eval()
    ids = torch.randint(3, 300, (1, 16), generator=torch.Generator().manual_seed(1))
    routes = torch.tensor([[0] * 4 + [1] * 6 + [0] * 6])
    before = _logits(model, ids, routes)  # a first forward may repack weights for the CPU kernel: snapshot after
    packed = {path: layer.base.weight.detach().clone() for path, layer in model.routed.items()}
    model.fold_text_route()
    assert not model.routing.folded  # the text delta stays a route, applied on every token
    assert all(torch.equal(layer.base.weight, packed[path]) for path, layer in model.routed.items())
    assert torch.equal(_logits(model, ids, routes), before)
    # and the text delta is applied: without it the text tokens' logits differ
    assert _relative(_logits(model, ids, routes, deltas=False), before) > 0.05
    generated = model.generate([model.example("The answer is")], 6)
    model.unfold_text_route()
    assert model.generate([model.example("The answer is")], 6) == generated


@needs_bitsandbytes
def test_eval_runs_an_8bit_model(composed_checkpoint: Path, tmp_path: Path) -> None:
    import json

    samples = [{"id": f"q{index}", "modal_inputs": {}, "conversations": [
        {"from": "human", "value": f"Which one, {index}? A. desert B. forest C. sea D. cave"},
        {"from": "gpt", "value": "B"}]} for index in range(3)]
    task = tmp_path / "task.json"
    task.write_text(json.dumps(samples))
    result = CliRunner().invoke(app, ["eval", "--task", str(task), "--model", str(composed_checkpoint), "-o",
                                      str(tmp_path / "out"), "--max-new-tokens", "3", "--quantize", "8bit"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["n"] == 3 and metrics["n_failed"] == 0


@needs_bitsandbytes
def test_chat_and_serve_run_a_4bit_model(composed_checkpoint: Path) -> None:
    import http.client
    import json

    from mmcompose.serve import ServerConfig

    model = load_checkpoint(composed_checkpoint, quantize="4bit").eval()
    question = [{"from": "human", "value": "what is this?"}]
    expected = model.generate([model.conversation_example(question)], 8)[0]
    result = CliRunner().invoke(app, ["chat", "--model", str(composed_checkpoint), "--quantize", "4bit",
                                      "--max-new-tokens", "8", "what is this?"])
    assert result.exit_code == 0, result.output
    assert result.stdout == expected + "\n"
    server, thread, port = start_server(model, ServerConfig(model_id="q", max_batch=2, limits=LIMITS))
    try:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        connection.request("POST", "/v1/chat/completions", headers={"Content-Type": "application/json"},
                           body=json.dumps({"messages": [{"role": "user", "content": "what is this?"}],
                                            "max_tokens": 8}))
        response = connection.getresponse()
        reply = json.loads(response.read())
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    assert response.status == 200, reply
    assert reply["choices"][0]["message"]["content"] == expected.strip()
    assert not model.routing.folded


@needs_bitsandbytes
def test_the_gpu_checks_quantized_comparison_runs_on_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`benchmarks/quantized.py`'s `quantized_check` (called by the GPU check), reduced, so that it cannot rot."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from quantized import make_base as make_benchmark_base
    from quantized import quantized_check

    base = make_benchmark_base(tmp_path / "base", hidden=128, layers=2)
    figures = quantized_check(base, "4bit", rank=16, device="cpu", prompts=2, new_tokens=4)
    assert figures["kind"] == "4bit"
    assert 0 < figures["logits_relative_error"] < 0.3  # 0.15 measured: another random model than the ones above
    assert 0 <= figures["greedy_agreement"] <= 1
    assert set(figures["decode_tok_s"]) == {"bf16-folded", "4bit-unfused"}
    assert all(rate > 0 for rate in figures["decode_tok_s"].values())
