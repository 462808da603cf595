"""Load memory: peak RSS of `MultimodalLLM.from_pretrained` above the interpreter's own, as a ratio to the bytes of
the loaded model's tensors.

A random LLaMA (hidden 1024, MLP 2816, 8 layers, 16 heads, vocabulary 32000) with the four built-in modalities
(default encoders and connectors, 5 boundary tokens each) and a decoupled checkpoint (a language delta and one
delta per modality, rank 64, on all seven projections), base and checkpoint saved in bfloat16 (loading casts
nothing) or in float32 (every tensor is cast), is loaded in bfloat16 on the CPU, each time in a fresh process:
after the imports the process's peak RSS is reset (`/proc/self/clear_refs`), then the model is loaded, every
page of every tensor is read once, and `VmHWM - VmRSS(before)` is divided by the bytes of every parameter and
buffer of the loaded model. The anchor, measured the same way in the same run, is transformers'
`AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)` of the base LLM alone. `--src` measures
another source tree (e.g. the main branch before the in-place loader) in the same run, alternating.
Run: `python benchmarks/load_memory.py --repeats 3 --src /work/main/src`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

import torch
from report import publish
from transformers import LlamaConfig, LlamaForCausalLM

from mmcompose.model import MultimodalLLM, modality_spec
from mmcompose.train.tokenizer import train_tokenizer

MODALITIES = ["image", "audio", "video", "point"]
STORED = {"bfloat16": torch.bfloat16, "float32": torch.float32}
ANCHOR = Path("transformers: the base LLM alone")
CHILD = r"""
import json, sys, torch
from mmcompose.model import MultimodalLLM

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

before = status("VmRSS")
with open("/proc/self/clear_refs", "w") as handle:
    handle.write("5")  # reset VmHWM to the current RSS
if sys.argv[2] == "anchor":
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1] + "/../base", dtype=torch.bfloat16)
else:
    model = MultimodalLLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
loaded = status("VmHWM")
seen, size = set(), 0
for tensor in [*model.parameters(), *model.buffers()]:
    if tensor.device.type != "meta" and tensor.data_ptr() not in seen:
        seen.add(tensor.data_ptr())
        size += tensor.numel() * tensor.element_size()
        tensor.detach().reshape(-1).view(torch.uint8)[::4096].sum()  # one byte a page: faults in mapped pages
print(json.dumps({"before": before, "loaded": loaded, "peak": status("VmHWM"), "tensors": size}))
"""


def build(directory: Path, stored: torch.dtype) -> Path:
    """The base LLM and the decoupled checkpoint, both saved in `stored`; returns the checkpoint directory."""
    tokenizer = train_tokenizer(["USER: what is it? ASSISTANT: a red fox that lives in the forest."] * 50,
                                vocab_size=300)
    config = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                         num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=4096,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(stored).save_pretrained(directory / "base")
    tokenizer.save_pretrained(directory / "base")
    specs = [modality_spec(m, num_prefix_tokens=5, num_suffix_tokens=5) for m in MODALITIES]
    model = MultimodalLLM.from_base(directory / "base", specs, strategy="decoupled", rank=64, alpha=128.0,
                                    dtype=stored)
    with torch.no_grad():
        for name, tensor in model.named_parameters():
            if ".deltas." in name:
                tensor.normal_(0, 0.02)
    return model.save_pretrained(directory / "ckpt")


def measure(checkpoint: Path, src: Path, what: str = "model") -> dict[str, int]:
    environment = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", CHILD, str(checkpoint), what], env=environment, check=True,
                            capture_output=True, text=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--src", type=Path, action="append", default=[],
                        help="Another source tree to measure beside this one (repeatable), e.g. /work/main/src.")
    parser.add_argument("--results", type=Path, default=Path(__file__).with_name("RESULTS.md"))
    args = parser.parse_args()
    here = Path(__file__).resolve().parents[1] / "src"
    trees = [here, *[path.resolve() for path in args.src]]
    load = os.getloadavg()[0]
    runs: dict[tuple[str, Path], list[dict[str, int]]] = {}
    for stored in STORED:
        with tempfile.TemporaryDirectory() as scratch:
            checkpoint = build(Path(scratch), STORED[stored])
            for _ in range(args.repeats):
                runs.setdefault((stored, ANCHOR), []).append(measure(checkpoint, here, "anchor"))
                for tree in trees:
                    runs.setdefault((stored, tree), []).append(measure(checkpoint, tree))
    lines = [f"## load_memory ({date.today().isoformat()})", "",
             f"- command: `python benchmarks/load_memory.py --repeats {args.repeats}"
             + "".join(f" --src {path}" for path in args.src) + "`",
             f"- machine: {platform.machine()}, {os.cpu_count()} cores, load average {load:.1f} at the start; "
             f"torch {torch.__version__}, OMP_NUM_THREADS=1",
             "- model: LLaMA hidden 1024, MLP 2816, 8 layers, vocabulary 32000; 4 built-in modalities "
             "with 5 + 5 boundary tokens; decoupled deltas rank 64 on 7 projections (5 deltas); base and checkpoint "
             "stored in bf16 or in fp32; "
             "loaded with `from_pretrained(dtype=torch.bfloat16)` on the CPU, one fresh process per measurement",
             "- peak: VmHWM minus VmRSS before loading (peak reset after the imports), right after `from_pretrained` "
             "(`loaded`: weights transformers maps from the base's files without reading are not resident yet) and "
             "after reading every byte of every tensor once (`touched`: all of the model resident, as after a first "
             "forward); ratio = peak / bytes of the loaded model's parameters and buffers; median and min-max over "
             "repeats", "",
             "| stored | source | tensors MiB | loaded: peak MiB | loaded: ratio | touched: peak MiB | touched: "
             "ratio (median) | touched: ratio min-max |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for (stored, tree), results in runs.items():
        loaded = [(r["loaded"] - r["before"]) / r["tensors"] for r in results]
        ratios = [(r["peak"] - r["before"]) / r["tensors"] for r in results]
        name = "this tree" if tree == here else str(tree) if tree != ANCHOR else f"anchor ({tree})"
        mib = results[0]["tensors"] / 2**20
        lines.append(f"| {stored} | {name} | {mib:,.1f} | {statistics.median(loaded) * mib:,.1f} | "
                     f"{statistics.median(loaded):.3f} | {statistics.median(ratios) * mib:,.1f} | "
                     f"{statistics.median(ratios):.3f} | {min(ratios):.3f}-{max(ratios):.3f} |")
    publish(lines, args.results)


if __name__ == "__main__":
    main()
