"""What a quantized base costs per decoded token: the text route's delta unfused beside a 4-bit/8-bit base.

Folding the text delta into `W` is impossible on packed weights (bitsandbytes), so over a quantized base every
generated token pays the text delta's low-rank product. Measured here on a random LLaMA whose widths keep the
released system's proportions (text delta rank / width = 512 / 4096 = 1/8; MLP width 2.75x; a small
vocabulary, so that the LM head weighs as little as it does next to a 7B model's linears), all variants
sharing the same weights, the same prompt and interleaved in one run:

* bf16-folded  - the anchor: bfloat16 base, text delta folded into W (what `serve` runs unquantized);
* bf16-unfused - the same model without folding: the delta's cost on a 16-bit base;
* 8bit-unfused - the base's linears LLM.int8() (bitsandbytes), the deltas in bfloat16 beside them;
* 4bit-unfused - the same with NF4;
* 4bit-bare    - the NF4 base alone (no deltas): what the delta adds on top of the 4-bit matmuls.

Decode tok/s is 1 / the median interval between successive generated tokens (prefill excluded); ratios are to
bf16-folded, medians with the min-max spread over repeats. Run: `python benchmarks/quantized.py`.

`quantized_check` is the comparison for a CUDA machine, callable from a GPU check: greedy answers and logits of
the quantized model against the bfloat16 one, decode tok/s of both, and peak device memory (tested on the CPU
in reduced form).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Any

import torch
from fixtures import randomize_deltas
from report import publish
from routing import decode_seconds
from transformers import LlamaConfig, LlamaForCausalLM

from mmcompose.model import Example, MultimodalLLM
from mmcompose.train.tokenizer import train_tokenizer

MODALITIES = ["image", "audio"]
PROMPT = "USER: " + " ".join(f"word{i} and thing{i * 7} ." for i in range(12)) + " What is it? ASSISTANT:"


def mlp_width(hidden: int) -> int:
    """LLaMA-7B's proportion (11008 / 4096 ~ 2.69), rounded to a multiple of 64."""
    return hidden * 11 // 4 // 64 * 64


def make_base(directory: Path, hidden: int, layers: int) -> Path:
    """A random LLaMA saved in bfloat16 (widths multiples of 64: bitsandbytes' CPU 4-bit kernel packs blocks of
    64 inputs). No end-of-sequence token, so every run decodes the same number of tokens."""
    tokenizer = train_tokenizer([f"word{i} and thing{i * 7} ." for i in range(4000)], vocab_size=4096)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=mlp_width(hidden),
                         num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                         max_position_embeddings=2048, bos_token_id=tokenizer.bos_token_id, eos_token_id=None,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def build(base: Path, rank: int, quantize: str | None, deltas: bool = True, device: str = "cpu") -> MultimodalLLM:
    """The decoupled model (text delta + one delta per modality) on `device` with the same random delta values
    for every `quantize`, so all variants answer alike up to quantization."""
    model = MultimodalLLM.from_base(base, MODALITIES, strategy="decoupled" if deltas else "connector-only",
                                    rank=rank, alpha=float(rank), device=device, dtype=torch.bfloat16,
                                    quantize=quantize)
    model.tokenizer.eos_token_id = None  # decode exactly the tokens asked for
    randomize_deltas(model)
    return model.eval()


def decode_rate(model: MultimodalLLM, examples: list[Example], new_tokens: int) -> float:
    """Seconds per decoded token of `model.generate` (median interval between tokens of row 0)."""
    times: list[tuple[float, float]] = []
    model.generate(examples, max_new_tokens=new_tokens,
                   on_token=lambda row, token: times.append((time.perf_counter(), 0.0)) if row == 0 else None)
    return decode_seconds(times, new_tokens)[0]  # wall seconds


def delta_flops_ratio(hidden: int, intermediate: int, rank: int) -> float:
    """Multiply-adds of a rank-`rank` delta on the 7 target linears of one LLaMA layer, per token, over the
    base's: `rank * (in + out)` against `in * out` for q/k/v/o (h x h) and gate/up/down (h x i)."""
    base = 4 * hidden * hidden + 3 * hidden * intermediate
    delta = 4 * rank * 2 * hidden + 3 * rank * (hidden + intermediate)
    return delta / base


def quantized_check(base: Path, kind: str, *, rank: int, device: str = "cuda", prompts: int = 4,
                    new_tokens: int = 32) -> dict[str, Any]:
    """The bfloat16 model and the `kind`-quantized one on `device`: greedy agreement, logits' relative error,
    decode tok/s of each, and the peak device memory above the bf16 reference's weights (the quantized model's
    weights plus either model's activations). Returns the figures by name.
    """
    examples = [Example(prompt=f"{PROMPT} {index}") for index in range(prompts)]
    reference = build(base, rank, None, device=device)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        held = torch.cuda.memory_allocated()  # the reference's, excluded from the quantized model's peak
    quantized = build(base, rank, kind, device=device)
    with torch.no_grad():
        batch = reference.assemble(examples, padding_side="left")
        expected = reference(batch).logits.float()
        got = quantized(quantized.assemble(examples, padding_side="left")).logits.float()
        error = float((got - expected).norm() / expected.norm())
        answers = reference.generate(examples, new_tokens), quantized.generate(examples, new_tokens)
        reference.fold_text_route()
        rates = {"bf16-folded": 1 / decode_rate(reference, examples[:1], new_tokens),
                 f"{kind}-unfused": 1 / decode_rate(quantized, examples[:1], new_tokens)}
    peak = (torch.cuda.max_memory_allocated() - held) / 2**30 if cuda else float("nan")
    return {"kind": kind, "logits_relative_error": error,
            "greedy_agreement": sum(a == b for a, b in zip(*answers, strict=True)) / len(examples),
            "decode_tok_s": rates, "peak_gib": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--rank", type=int, default=None, help="Text delta rank (default: hidden / 8, as released).")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--results", type=Path, default=Path(__file__).with_name("RESULTS.md"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rank = args.rank or args.hidden // 8

    with tempfile.TemporaryDirectory() as scratch:
        base = make_base(Path(scratch) / "base", args.hidden, args.layers)
        folded = build(base, rank, None)
        folded.fold_text_route()
        variants = {"bf16-folded": folded, "bf16-unfused": build(base, rank, None),
                    "8bit-unfused": build(base, rank, "8bit"), "4bit-unfused": build(base, rank, "4bit"),
                    "4bit-bare": build(base, rank, "4bit", deltas=False)}
        examples = [Example(prompt=PROMPT)]
        prompt_tokens = len(folded.tokenizer(PROMPT)["input_ids"])
        samples: dict[str, list[float]] = {name: [] for name in variants}
        with torch.no_grad():
            for model in variants.values():  # warm-up (and bitsandbytes' one-time CPU repacking of 4-bit)
                decode_rate(model, examples, 4)
            for _ in range(args.repeats):  # interleaved, so load changes hit every variant alike
                for name, model in variants.items():
                    samples[name].append(decode_rate(model, examples, args.new_tokens))
        parameters = sum(p.numel() for name, p in variants["bf16-unfused"].llm.named_parameters()
                         if ".deltas." not in name)

    import bitsandbytes

    ratio = delta_flops_ratio(args.hidden, mlp_width(args.hidden), rank)
    lines = [
        f"## quantized ({date.today().isoformat()})",
        "",
        f"- command: `python benchmarks/quantized.py --hidden {args.hidden} --layers {args.layers} --rank {rank} "
        f"--new-tokens {args.new_tokens} --repeats {args.repeats} --threads {args.threads}`",
        f"- machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, bitsandbytes "
        f"{bitsandbytes.__version__} (CPU backend), {args.threads} thread(s), load average "
        f"{os.getloadavg()[0]:.1f} at the end; variants interleaved, medians",
        f"- model: LLaMA {parameters / 1e6:.1f}M parameters without deltas (hidden {args.hidden}, "
        f"MLP {mlp_width(args.hidden)}, {args.layers} layers), decoupled over {', '.join(MODALITIES)}: "
        f"text delta rank {rank} "
        f"({ratio:.1%} of the target linears' multiply-adds per token); prompt {prompt_tokens} tokens, batch 1",
        "",
        "| variant | decode tok/s (min-max) | vs bf16-folded |",
        "|---|---|---|",
    ]
    anchor = statistics.median(samples["bf16-folded"])
    for name, seconds in samples.items():
        speeds = [1 / s for s in seconds]
        lines.append(f"| {name} | {statistics.median(speeds):.1f} ({min(speeds):.1f}-{max(speeds):.1f}) "
                     f"| {anchor / statistics.median(seconds):.3f}x |")
    lines += ["", "On a CPU bitsandbytes dequantizes in its own kernels, so quantized decode speed here says "
              "nothing of a GPU's (where decode is bound by the bytes read per token); compare "
              "4bit-unfused with 4bit-bare for what the unfused text delta adds."]
    publish(lines, args.results)


if __name__ == "__main__":
    main()
