"""Routing cost: a 4-modality DAMC-composed model vs its bare base LLM vs compute-all-then-mask.

A composed model with four modality deltas plus a text delta (rank 16) on a ~60M-parameter LLaMA, all
three variants sharing the same weights and the same decode loop, measured in the same run:

* base      - the bare base LLM (no deltas);
* routed    - mmcompose: text delta folded into W, each modality's `D_m - D_text` on its own tokens only;
* masked    - the official code's approach: every delta computed on every token, then masked by route.

Prints and appends to benchmarks/RESULTS.md: prefill time for a prompt with all four modalities and
decode tokens/s, each as a ratio to the base. Run: `python benchmarks/routing.py`.
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

import torch
from report import publish
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from mmcompose.model import Example, MultimodalLLM, RoutedLinear, modality_spec
from mmcompose.train.tokenizer import train_tokenizer

MODALITIES = ["image", "audio", "video", "point"]
INPUTS = {"image": (3, 32, 32), "audio": (16000,), "video": (8, 3, 32, 32), "point": (512, 3)}


class MaskedLinear(nn.Module):
    """Reference: `W x + sum_d mask_d(x) * D_d x`, every delta computed on every token."""

    def __init__(self, routed: RoutedLinear, route_masks: dict[str, torch.Tensor | None]) -> None:
        super().__init__()
        self.base, self.deltas, self.route_masks = routed.base, routed.deltas, route_masks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        for name, delta in self.deltas.items():
            mask = self.route_masks.get(name)
            update = delta(x)
            y = y + (update if mask is None else update * mask)
        return y


def make_base(directory: Path) -> Path:
    tokenizer = train_tokenizer([f"word{i} and thing{i * 7} ." for i in range(4000)], vocab_size=4096)
    config = LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=2048,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=None, tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def build(base: Path, strategy: str, rank: int) -> MultimodalLLM:
    specs = [modality_spec(m, num_prefix_tokens=5, num_suffix_tokens=5) for m in MODALITIES]
    model = MultimodalLLM.from_base(base, specs, strategy=strategy, rank=rank, alpha=2.0 * rank)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in model.routed.values():
            for delta in layer.deltas.values():
                for parameter in delta.parameters():
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)
    return model.eval()


def time_once(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--results", type=Path, default=Path(__file__).with_name("RESULTS.md"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as scratch:
        base_path = make_base(Path(scratch) / "base")
        base = build(base_path, "connector-only", args.rank)
        composed = build(base_path, "decoupled", args.rank)
        parameters = sum(p.numel() for p in base.llm.parameters())
        generator = torch.Generator().manual_seed(2)
        example = Example(
            prompt="USER: " + "\n".join(f"<{m}>" for m in MODALITIES) + "\nWhat do these four have in common? "
            "A. desert B. forest C. sea D. cave. Answer with the letter. ASSISTANT:",
            inputs={m: [torch.randn(INPUTS[m], generator=generator)] for m in MODALITIES},
        )
        with torch.no_grad():
            batch = composed.assemble([example], padding_side="left")
        base.branches.load_state_dict(composed.branches.state_dict())

        def prefill(model: MultimodalLLM):
            return lambda: model(batch, logits_to_keep=1)

        def decode(model: MultimodalLLM):
            def run() -> None:
                count = []
                model.generate([example], max_new_tokens=args.new_tokens, on_token=lambda row, token: count.append(1))
                if len(count) != args.new_tokens:
                    raise RuntimeError(f"generation stopped after {len(count)} tokens; the rate would be wrong")
            return run

        composed.fold_text_route()
        masked = build(base_path, "decoupled", args.rank)  # the same seeds: the same weights as `composed`
        masked.branches.load_state_dict(composed.branches.state_dict())
        ids = masked.spec.route_ids()
        prompt_masks = {d.name: torch.isin(batch.routes, torch.tensor([ids[r] for r in d.routes])).unsqueeze(-1).float()
                        for d in masked.spec.deltas}
        text_masks = {d.name: (None if "text" in d.routes else torch.zeros(1, 1, 1)) for d in masked.spec.deltas}
        layers = []
        for path, layer in masked.routed.items():
            parent, _, attribute = path.rpartition(".")
            layers.append(MaskedLinear(layer, prompt_masks))
            setattr(masked.llm.get_submodule(parent), attribute, layers[-1])

        def with_masks(masks: dict, function):
            def run() -> None:
                for layer in layers:
                    layer.route_masks = masks
                function()
            return run

        variants = {
            "base": (prefill(base), decode(base)),
            "routed": (prefill(composed), decode(composed)),
            "masked": (with_masks(prompt_masks, prefill(masked)), with_masks(text_masks, decode(masked))),
        }
        samples = {name: {"prefill": [], "decode": []} for name in variants}
        with torch.no_grad():
            for first, second in variants.values():  # warm-up
                first()
                second()
            for _ in range(args.repeats):  # interleaved, so load changes hit every variant alike
                for name, (first, second) in variants.items():
                    samples[name]["prefill"].append(time_once(first))
                    samples[name]["decode"].append(time_once(second))
        results = {name: {k: statistics.median(v) for k, v in timing.items()} for name, timing in samples.items()}

    tokens = int(batch.attention_mask.sum())
    lines = [
        f"## routing ({date.today().isoformat()})",
        "",
        f"- command: `python benchmarks/routing.py --rank {args.rank} --new-tokens {args.new_tokens} "
        f"--repeats {args.repeats} --threads {args.threads}`",
        f"- machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {args.threads} "
        f"thread(s), load average {os.getloadavg()[0]:.1f} at the end; variants interleaved, medians",
        f"- model: LLaMA {parameters / 1e6:.1f}M parameters, 4 modalities, decoupled rank {args.rank} "
        f"(4 modality deltas + text delta), prompt {tokens} tokens ({int((batch.routes > 0).sum())} modality)",
        "",
        "| variant | prefill ms | prefill vs base | decode tok/s | decode vs base |",
        "|---|---|---|---|---|",
    ]
    for name, result in results.items():
        speed = args.new_tokens / result["decode"]
        prefill_ratio = result["prefill"] / results["base"]["prefill"]
        decode_ratio = results["base"]["decode"] / result["decode"]
        lines.append(f"| {name} | {1000 * result['prefill']:.1f} | {prefill_ratio:.3f}x "
                     f"| {speed:.1f} | {decode_ratio:.3f}x |")
    publish(lines, args.results)


if __name__ == "__main__":
    main()
