"""Memory of folding the text route: what `fold_text_route()` adds to the process, as a share of the model.

A random LLaMA (hidden 2048, 8 layers by default, bf16 on disk) composed the DAMC way over the four built-in
modalities: four modality LoRAs and the text route's LoRA, rank 128, loaded in bf16. Each measurement runs in a
fresh child process (so the parent's base-building heap is not counted), which loads the model, reads its RSS
(`/proc/self/status`, after `malloc_trim`) once it has answered one prompt (so that every weight is paged
in and every lazy allocation made), folds, and reads the RSS and the peak RSS of the fold (`VmHWM`, reset
just before through `/proc/self/clear_refs`); then it answers the prompt folded, and unfolds. The figures are
ratios to the bytes of the model's tensors (base LLM, branches and deltas). `--against SRC` measures a second
source tree (e.g. `/work/main/src`, the code before this change) in the same run, with the same base.

RSS counts file-backed pages too: transformers may leave weights that need no cast mapped from the safetensors
file, and the fold's in-place add turns those pages into private (anonymous) ones of the same size. So RssAnon
can grow by the folded weights while RSS does not; both are reported.

Run: `python benchmarks/fold_memory.py --against /work/main/src`.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch
from fixtures import randomize_deltas
from report import publish

MODALITIES = ["image", "audio", "video", "point"]
INPUTS = {"image": (3, 32, 32), "audio": (16000,), "video": (8, 3, 32, 32), "point": (512, 3)}
MIB = 2**20


def make_base(directory: Path, hidden: int, layers: int) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    from mmcompose.train.tokenizer import train_tokenizer

    tokenizer = train_tokenizer([f"word{i} and thing{i * 7} ." for i in range(4000)], vocab_size=4096)
    config = LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                         num_hidden_layers=layers, num_attention_heads=hidden // 128, num_key_value_heads=hidden // 128,
                         max_position_embeddings=2048, bos_token_id=tokenizer.bos_token_id, eos_token_id=None,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def status() -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon and RssFile of this process, in bytes."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            fields[key] = int(value.split()[0]) * 1024
    return fields


def settle() -> dict[str, int]:
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return status()


def measure(base: Path, rank: int) -> dict:
    """In a child process: load, fold, answer, unfold; the RSS at each step."""
    from mmcompose.model import Example, MultimodalLLM, modality_spec

    torch.set_num_threads(1)
    specs = [modality_spec(m, num_prefix_tokens=5, num_suffix_tokens=5) for m in MODALITIES]
    model = MultimodalLLM.from_base(base, specs, strategy="decoupled", rank=rank, alpha=2.0 * rank,
                                    dtype=torch.bfloat16).eval()
    model.branches.to(torch.bfloat16)
    randomize_deltas(model)
    generator = torch.Generator().manual_seed(1)
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in model.state_dict().values()}
    example = Example(prompt="USER: " + "\n".join(f"<{m}>" for m in MODALITIES) + "\nWhat is common? ASSISTANT:",
                      inputs={m: [torch.randn(INPUTS[m], generator=generator)] for m in MODALITIES})
    model.generate([example], max_new_tokens=4)  # every weight paged in, every lazy allocation made
    loaded = settle()
    Path("/proc/self/clear_refs").write_text("5")
    start = time.perf_counter()
    model.fold_text_route()
    fold_seconds = time.perf_counter() - start
    fold_peak = status()["VmHWM"]
    folded = settle()
    model.generate([example], max_new_tokens=4)
    answered = settle()
    start = time.perf_counter()
    model.unfold_text_route()
    unfold_seconds = time.perf_counter() - start
    unfolded = settle()
    return {"model_bytes": sum(storages.values()), "loaded": loaded, "fold_peak": fold_peak, "folded": folded,
            "answered": answered, "unfolded": unfolded, "fold_s": fold_seconds, "unfold_s": unfold_seconds}


def run_child(source: Path, base: Path, rank: int) -> dict:
    environment = {**os.environ, "PYTHONPATH": f"{source}{os.pathsep}{Path(__file__).parent}",
                   "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, __file__, "--measure", str(base), "--rank", str(rank)], env=environment,
                          check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def row(label: str, result: dict) -> str:
    size, before = result["model_bytes"], result["loaded"]

    def grow(key: str, after: dict) -> str:
        return f"{(after[key] - before[key]) / MIB:+.0f} ({(after[key] - before[key]) / size:+.3f}x)"

    peak = result["fold_peak"] - before["VmRSS"]
    return (f"| {label} | {size / MIB:.0f} | {before['VmRSS'] / MIB:.0f} | {grow('VmRSS', result['folded'])} | "
            f"{peak / MIB:+.0f} ({peak / size:+.3f}x) | {grow('RssAnon', result['folded'])} | "
            f"{(result['unfolded']['VmRSS'] - result['answered']['VmRSS']) / MIB:+.0f} | "
            f"{result['fold_s']:.2f} / {result['unfold_s']:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--against", type=Path, help="another source tree to measure in the same run")
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--results", type=Path, default=Path(__file__).with_name("RESULTS.md"))
    args = parser.parse_args()
    if args.measure is not None:
        print(json.dumps(measure(args.measure, args.rank)))
        return
    source = Path(__file__).resolve().parents[1] / "src"
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory() as scratch:
        base = make_base(Path(scratch) / "base", args.hidden, args.layers)
        results = {"this code": run_child(source, base, args.rank)}
        if args.against is not None:
            results[f"`{args.against}`"] = run_child(args.against, base, args.rank)
    load_end = os.getloadavg()
    lines = [
        f"## fold_memory ({date.today().isoformat()})",
        "",
        f"- command: `python benchmarks/fold_memory.py --hidden {args.hidden} --layers {args.layers} "
        f"--rank {args.rank}" + (f" --against {args.against}`" if args.against else "`"),
        f"- machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; load average "
        f"{load_start[0]:.1f} at the start, {load_end[0]:.1f} at the end",
        f"- model: LLaMA hidden {args.hidden}, {args.layers} layers, bf16 on disk and in memory; DAMC over "
        f"{len(MODALITIES)} modalities: {len(MODALITIES)} modality LoRAs + the text LoRA, rank {args.rank}",
        "",
        "| code | model tensors MiB | RSS loaded MiB | RSS growth by fold MiB (x model) | peak during fold "
        "(x model) | RssAnon growth by fold | RSS change by unfold MiB | fold / unfold s |",
        "|---|---|---|---|---|---|---|---|",
        *[row(label, result) for label, result in results.items()],
        "",
        "Growth is measured from the RSS of the loaded model after one answer and `malloc_trim`; the peak is "
        "`VmHWM` over the fold; the unfold's change is from the RSS after answering one prompt folded.",
    ]
    publish(lines, args.results)


if __name__ == "__main__":
    main()
