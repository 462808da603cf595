"""Quantized base weights, the QLoRA way: the base LLM's linears 4-bit or 8-bit (bitsandbytes), the deltas in
16-bit beside them.

A packed weight (bitsandbytes `Linear8bitLt`: int8 with per-row scales; `Linear4bit`: two NF4 codes per byte
with block-wise absmax) cannot take a delta added into it, nor lend its dtype to one. So over a packed layer
the routed layer creates its deltas in the model's compute dtype, calls the layer as a module (its own
matmul dequantizes), and the text route's delta is never folded: it is applied unfused on every token, a
rank-R product beside the base matmul (the README gives the per-token cost).

Which `nn.Linear` subclasses a routed layer handles is decided here, once: a plain `torch.nn.Linear` with an
ordinary floating weight, and bitsandbytes' two quantized linears. Anything else (an FP8 or other quantizer's
subclass, a plain `nn.Linear` whose weight is a tensor subclass such as torchao's) is refused in one line
naming the layer, because every way of getting it wrong (deltas in its storage dtype, adding into its
weight, reading `weight` as a dense matrix) is silent.

bitsandbytes rather than torchao: bitsandbytes 0.50 runs both kinds on the CPU (8-bit and NF4 4-bit forward
checked with torch 2.13), on CUDA and on the other backends it ships, transformers loads it straight from a
16-bit checkpoint (`quantization_config=BitsAndBytesConfig(...)`) with nothing converted on disk, and it is
what QLoRA and PEFT users already run. The difference from transformers' own defaults: 4-bit is NF4 with
double quantization (QLoRA's choice) and the compute dtype is the model's 16-bit dtype, where
`BitsAndBytesConfig` defaults to FP4 and float32 compute.
"""

from __future__ import annotations

import functools
import logging
import sys
from typing import TYPE_CHECKING, Literal

import torch
from torch import nn

from mmcompose.errors import MMComposeError

if TYPE_CHECKING:
    from transformers import BitsAndBytesConfig

Quantize = Literal["8bit", "4bit"]
QUANTIZE_KINDS: tuple[str, ...] = ("8bit", "4bit")
DEFAULT_COMPUTE_DTYPE = torch.bfloat16
_INT8_CAST_MESSAGE = "MatMul8bitLt: inputs will be cast from"


def check_quantize(kind: str, dtype: torch.dtype | str | None = None,
                   device: str | torch.device | None = None) -> torch.dtype:
    """Check that `--quantize kind` can run here, before anything large is allocated; return the compute dtype
    (the dtype of the deltas, branches and unquantized layers: `dtype`, or bfloat16 when it is None or `auto`,
    whatever dtype the base is stored in).

    float32 is refused: the point of a quantized base is memory, and float32 deltas and branches take twice
    the bytes of 16-bit ones (2.56B delta parameters are 9.5 GiB in float32, more than the 4-bit base itself);
    nor would it buy precision on 8-bit, whose matmul bitsandbytes computes in float16 whatever the input.
    `device` is where the quantized layers go (None: the first GPU if there is one, else the CPU, as
    transformers places a bitsandbytes model without a device map); a tiny layer of `kind` is quantized and
    run there, so that a bitsandbytes build without that kernel on that device fails here, in one line.
    """
    if kind not in QUANTIZE_KINDS:
        raise MMComposeError(f"--quantize {kind!r}: expected one of {', '.join(QUANTIZE_KINDS)}")
    compute = DEFAULT_COMPUTE_DTYPE if dtype in (None, "auto") else \
        getattr(torch, dtype, dtype) if isinstance(dtype, str) else dtype
    if compute not in (torch.bfloat16, torch.float16):
        raise MMComposeError(f"--quantize {kind} with --dtype {str(compute).removeprefix('torch.')}: a quantized "
                             f"base keeps its deltas and branches in 16-bit (bfloat16 or float16); float32 would "
                             f"double their memory")
    try:
        import bitsandbytes  # its import-time kernel-fetch warning is silenced by `mmcompose/__init__.py`
    except ImportError:
        raise MMComposeError(f"--quantize {kind}: needs bitsandbytes, which is not installed "
                             f"(pip install 'mmcompose[quantize]')") from None
    target = torch.device(device) if device is not None else \
        torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        _probe(kind, compute, target)
    except Exception as error:  # any failure of the probe means this kind cannot run here
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise MMComposeError(f"--quantize {kind}: bitsandbytes {bitsandbytes.__version__} cannot run {kind} "
                             f"layers on {target} ({reason})") from None
    return compute


@functools.cache
def _probe(kind: str, dtype: torch.dtype, device: torch.device) -> None:
    """Quantize a 64x64 layer of `kind` on `device` and run it once: what loading the model will ask (once
    per process: a success is cached, a failure raises again)."""
    import bitsandbytes as bnb

    quiet_int8_cast_notice()
    if kind == "8bit":
        layer: nn.Module = bnb.nn.Linear8bitLt(64, 64, bias=False, has_fp16_weights=False)
    else:
        layer = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=dtype, quant_type="nf4")
    layer = layer.to(device)
    if not is_packed(layer):
        raise RuntimeError(f"the layer was not quantized on {device}")
    output = layer(torch.ones(2, 64, dtype=dtype, device=device))
    if output.shape != (2, 64) or not bool(torch.isfinite(output).all()):
        raise RuntimeError("a test matmul gave no finite result")


def quantization_config(kind: str, dtype: torch.dtype) -> BitsAndBytesConfig:
    """transformers' `BitsAndBytesConfig` for `kind` (checked with `check_quantize` first) with compute `dtype`.

    8-bit: LLM.int8() with its default outlier threshold 6.0 (outlier features in 16-bit). 4-bit: NF4 with
    double quantization of the block scales, computing in `dtype`, as QLoRA does.
    """
    from transformers import BitsAndBytesConfig

    if kind == "8bit":
        quiet_int8_cast_notice()
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype)


class _DropInt8CastNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_INT8_CAST_MESSAGE)


def quiet_int8_cast_notice() -> None:
    """Drop bitsandbytes' "inputs will be cast to float16" record, which `Linear8bitLt` logs on every call
    with a bfloat16 input: once per layer per decoded token (224 lines a token on a 32-layer LLaMA). The cast
    itself is LLM.int8()'s documented design; the README says so instead."""
    logger = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(existing, _DropInt8CastNotice) for existing in logger.filters):
        logger.addFilter(_DropInt8CastNotice())


def is_packed(module: nn.Module) -> bool:
    """Whether `module` is a bitsandbytes quantized linear (never imports bitsandbytes: if it is not loaded,
    no module can be one of its layers)."""
    layers = sys.modules.get("bitsandbytes.nn")
    return layers is not None and isinstance(module, (layers.Linear8bitLt, layers.Linear4bit))


def routable_linear(module: nn.Linear, name: str = "") -> bool:
    """Check that a routed layer can sit over `module`; return whether its weight is packed (bitsandbytes).

    Known: a plain `torch.nn.Linear` whose weight is an ordinary floating tensor (on any device, meta
    included), and bitsandbytes' `Linear8bitLt` / `Linear4bit` (their subclasses `LinearNF4` / `LinearFP4`
    too). Everything else is refused, in one line naming the layer and its type.
    """
    if is_packed(module):
        _check_cpu_4bit_width(module, name)
        return True
    weight = module.weight
    if type(module) is nn.Linear and type(weight) in (nn.Parameter, torch.Tensor) and weight.is_floating_point():
        return False
    kind = type(module) if type(module) is not nn.Linear else type(weight)
    what = "layer" if type(module) is not nn.Linear else "weight"
    raise MMComposeError(f"{name or 'a linear layer'}: cannot add deltas to a {what} of type "
                         f"{kind.__module__}.{kind.__qualname__} (dtype {weight.dtype}); routed layers handle "
                         f"torch.nn.Linear and bitsandbytes' Linear8bitLt / Linear4bit (--quantize 8bit|4bit)")


def _check_cpu_4bit_width(module: nn.Module, name: str) -> None:
    """bitsandbytes' fused CPU 4-bit kernel (on CPUs with AVX512-BF16) repacks the weight by blocks of 64
    inputs and fails inside the first forward when a layer's input width is not a multiple of the block (every
    LLaMA width is); say so here, in one line, instead of a traceback mid-generation."""
    layers = sys.modules["bitsandbytes.nn"]
    if not isinstance(module, layers.Linear4bit) or module.weight.device.type != "cpu" or \
            not getattr(module, "support_avx512bf16_for_cpu", False):
        return
    blocksize = getattr(module.weight, "blocksize", 64)
    if module.in_features % blocksize:
        raise MMComposeError(f"{name or 'a linear layer'}: bitsandbytes' CPU 4-bit kernel needs input widths that "
                             f"are multiples of {blocksize}, this layer's is {module.in_features} (use --quantize "
                             f"8bit, or 4bit on a GPU)")
