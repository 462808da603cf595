"""Numerics of bf16 merges, mmcompose vs mergekit 0.1.5, on unequal weights 0.5/0.3/0.2.

A bf16 LLaMA base and three fine-tunes (base + 0.002 * N(0, 1) per entry, rounded to bf16). For task arithmetic,
each tool's output is compared with the float32 result rounded once to bf16 (and with the float64 one). For TIES
(density 0.5, mergekit's defaults), ours is compared with mergekit computing in bf16 (`dtype: bfloat16`) and in
float32 (`dtype: float32`, its result rounded to bf16), and each differing entry is checked against the trim
threshold: is it tied in magnitude with some input's threshold (the k-th largest |delta| of that input)?
Run: `python benchmarks/mergekit_bf16.py` (needs mergekit; ~1 min, ~50 MB of disk).
"""

from __future__ import annotations

import platform
import tempfile
from datetime import date
from pathlib import Path

import torch
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions
from report import publish
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from mmcompose.compose.config import parse_merge_config
from mmcompose.compose.llm_merge import merge_llms

WEIGHTS = [0.5, 0.3, 0.2]
DENSITY = 0.5


def load(directory: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


def make_models(root: Path) -> tuple[Path, list[Path]]:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=2048, max_position_embeddings=64, tie_word_embeddings=False)
    base = LlamaForCausalLM(config).to(torch.bfloat16)
    base.save_pretrained(root / "base")
    tuned = []
    for i in range(len(WEIGHTS)):
        with torch.no_grad():
            for param in base.parameters():
                param.add_(0.002 * torch.randn_like(param, dtype=torch.float32))
        base.save_pretrained(root / f"ft{i}")
        tuned.append(root / f"ft{i}")
        base = LlamaForCausalLM.from_pretrained(root / "base", dtype=torch.bfloat16)
    return root / "base", tuned


def run_mergekit(root: Path, base: Path, tuned: list[Path], method: str, params: dict, dtype: str) -> dict:
    mergekit = MergeConfiguration.model_validate({
        "merge_method": method, "base_model": str(base), "dtype": dtype,
        "models": [{"model": str(p), "parameters": {"weight": w, **params}}
                   for p, w in zip(tuned, WEIGHTS, strict=True)],
    })
    out = root / f"mergekit-{method}-{dtype}"
    run_merge(mergekit, str(out), MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True))
    return {name: tensor.bfloat16() for name, tensor in load(out).items()}


def run_ours(root: Path, base: Path, tuned: list[Path], ours: str, params: dict) -> dict:
    config = parse_merge_config({"base": str(base), "merge": ours, "parameters": params,
                                 "models": [{"path": str(p), "lambda": w}
                                            for p, w in zip(tuned, WEIGHTS, strict=True)]})
    return load(merge_llms(config, root / f"ours-{ours}", progress=False))


def main() -> None:
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        base_dir, tuned_dirs = make_models(root)
        base, tuned = load(base_dir), [load(p) for p in tuned_dirs]
        total = sum(t.numel() for t in base.values())

        theirs = run_mergekit(root, base_dir, tuned_dirs, "task_arithmetic", {}, "bfloat16")
        ours = run_ours(root, base_dir, tuned_dirs, "linear", {})
        wrong = {key: 0 for key in ("mergekit32", "mmcompose32", "mergekit64", "mmcompose64")}
        for name, b in base.items():
            for bits, dtype in (("32", torch.float32), ("64", torch.float64)):
                exact = (b.to(dtype) + sum(w * (t[name].to(dtype) - b.to(dtype))
                                           for w, t in zip(WEIGHTS, tuned, strict=True))).bfloat16()
                wrong["mergekit" + bits] += int((theirs[name] != exact).sum())
                wrong["mmcompose" + bits] += int((ours[name] != exact).sum())

        ours = run_ours(root, base_dir, tuned_dirs, "ties", {"density": DENSITY})
        ties = {dtype: tie_differences(base, tuned, ours, run_mergekit(root, base_dir, tuned_dirs, "ties",
                                                                        {"density": DENSITY}, dtype))
                for dtype in ("bfloat16", "float32")}

    def share(count: int) -> str:
        return f"{count:,} ({100 * count / total:.2f}%)"

    lines = [
        f"## mergekit_bf16 ({date.today().isoformat()})",
        "",
        "- command: `python benchmarks/mergekit_bf16.py`",
        f"- machine: {platform.machine()}, torch {torch.__version__}; LLaMA {total:,} parameters, bf16; "
        f"weights {'/'.join(map(str, WEIGHTS))}; TIES density {DENSITY}, mergekit defaults (normalize: true)",
        "",
        "| merge | compared | entries that differ |",
        "|---|---|---|",
        f"| task arithmetic | mergekit (bf16) vs float32 result rounded once | {share(wrong['mergekit32'])} |",
        f"| task arithmetic | mmcompose vs float32 result rounded once | {share(wrong['mmcompose32'])} |",
        f"| task arithmetic | mergekit (bf16) / mmcompose vs float64 result rounded once | "
        f"{share(wrong['mergekit64'])} / {share(wrong['mmcompose64'])} |",
    ]
    for dtype, (differ, at_threshold) in ties.items():
        lines.append(f"| ties | mmcompose vs mergekit `dtype: {dtype}` | {share(differ)}, of which "
                     f"{share(at_threshold)} tied with an input's trim threshold |")
    publish(lines, Path(__file__).with_name("RESULTS.md"))


def tie_differences(base: dict, tuned: list[dict], ours: dict, theirs: dict) -> tuple[int, int]:
    """(entries where ours and theirs differ, those of them tied in magnitude with an input's trim threshold)."""
    differ = at_threshold = 0
    for name, b in base.items():
        deltas = [(t[name].float() - b.float()).abs().flatten() for t in tuned]
        k = max(1, int(DENSITY * b.numel()))
        tied = torch.zeros(b.numel(), dtype=torch.bool)
        for d in deltas:
            threshold = torch.topk(d, k).values[-1]
            if int((d == threshold).sum()) > 1:  # several entries share the threshold: a tie to break
                tied |= d == threshold
        mask = (theirs[name] != ours[name]).flatten()
        differ += int(mask.sum())
        at_threshold += int((mask & tied).sum())
    return differ, at_threshold


if __name__ == "__main__":
    main()
