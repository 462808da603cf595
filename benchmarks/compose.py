"""Dense merging cost: mmcompose vs mergekit 0.1.5 on 3 full fine-tunes + base (~1B parameters, bf16).

Both tools run as subprocesses in the same run on the same files, with the page cache warm for both; for
each we record wall time and peak anonymous RSS (RssAnon sampled from /proc every 20 ms: file-backed
pages of memory-mapped inputs are cache, not memory the merge needs); dirty pages are synced before each run.
The I/O floor is the time to read every input byte once. Goals: <= 0.5x mergekit's time, <= its
anonymous RSS, <= 1.3x the floor.
Run: `python benchmarks/compose.py` (needs ~9 GB of disk and mergekit installed); `--models DIR` keeps the
generated models in DIR and reuses them on later runs with the same sizes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from datetime import date
from pathlib import Path

import torch
from report import publish
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

OURS = """
import sys
from mmcompose.compose.config import parse_merge_config
from mmcompose.compose.llm_merge import merge_llms
import json
spec = json.loads(sys.argv[1])
merge_llms(parse_merge_config(spec["config"]), spec["out"], progress=False)
"""


def make_models(root: Path, hidden: int, layers: int) -> tuple[Path, list[Path], int]:
    """Base and three fine-tunes under `root`, reused if a previous run with the same sizes left them there."""
    names = ["base", "ft0", "ft1", "ft2"]
    stamp = root / "sizes.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == {"hidden": hidden, "layers": layers}:
        with safe_open(root / "base" / "model.safetensors", "pt") as handle:
            tensors = handle.keys()
            parameters = sum(math.prod(handle.get_slice(n).get_shape()) for n in tensors)
        return root / "base", [root / n for n in names[1:]], parameters
    subprocess.run(["rm", "-rf", *[str(root / n) for n in names], str(stamp)], check=True)
    config = LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=int(hidden * 2.6875),
                         num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                         tie_word_embeddings=False, torch_dtype="bfloat16", architectures=["LlamaForCausalLM"])
    torch.manual_seed(0)
    with torch.device("meta"):
        shapes = {n: p.shape for n, p in LlamaForCausalLM(config).state_dict().items()}
    base = {n: (torch.randn(s) * 0.02).to(torch.bfloat16) for n, s in shapes.items()}
    paths = []
    for index, name in enumerate(names):
        directory = root / name
        directory.mkdir()
        config.save_pretrained(directory)
        tensors = base if index == 0 else {n: (t.float() + 0.002 * torch.randn(t.shape)).to(torch.bfloat16)
                                           for n, t in base.items()}
        save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
        paths.append(directory)
    stamp.write_text(json.dumps({"hidden": hidden, "layers": layers}))
    return paths[0], paths[1:], sum(t.numel() for t in base.values())


def run(command: list[str]) -> dict[str, float]:
    """Wall time and peak RssAnon (MiB) of a subprocess (and its children)."""
    os.sync()  # nobody pays for writing back the previous run's output
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = 0

    def sample() -> None:
        nonlocal peak
        while process.poll() is None:
            try:
                status = Path(f"/proc/{process.pid}/status").read_text()
                peak = max(peak, int(next(line.split()[1] for line in status.splitlines()
                                          if line.startswith("RssAnon:"))))
            except (FileNotFoundError, StopIteration, ProcessLookupError):
                pass
            time.sleep(0.02)

    thread = threading.Thread(target=sample)
    thread.start()
    _, error = process.communicate()
    thread.join()
    if process.returncode != 0:
        raise RuntimeError(f"{command[0]} failed: {error.decode()[-2000:]}")
    return {"seconds": time.perf_counter() - start, "rss_anon_mib": peak / 1024}


def read_floor(files: list[Path]) -> float:
    start = time.perf_counter()
    for file in files:
        with open(file, "rb") as handle:
            while handle.read(64 << 20):
                pass
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--results", type=Path, default=Path(__file__).with_name("RESULTS.md"))
    parser.add_argument("--models", type=Path, help="keep the generated models here and reuse them next time")
    parser.add_argument("--code", help="what the measured code is, for the `code:` line of the results")
    args = parser.parse_args()
    load_before = os.getloadavg()
    scratch = Path(tempfile.mkdtemp(prefix="mmcompose-bench-", dir=os.environ.get("BENCH_DIR")))
    try:
        if args.models:
            args.models.mkdir(parents=True, exist_ok=True)
        base, finetunes, parameters = make_models(args.models or scratch, args.hidden, args.layers)
        inputs = [base / "model.safetensors", *[f / "model.safetensors" for f in finetunes]]
        rows = []
        for method, ours, params in (("task_arithmetic", "linear", {}), ("ties", "ties", {"density": 0.5})):
            read_floor(inputs)  # warm the page cache the same way for everyone
            floor = read_floor(inputs)
            mergekit_config = scratch / f"{method}.yaml"
            models = [{"model": str(f), "parameters": {"weight": 1 / 3, **params}} for f in finetunes]
            mergekit_config.write_text(json.dumps({"merge_method": method, "base_model": str(base), "dtype": "bfloat16",
                                                   "models": models}))
            theirs = run([str(Path(sys.executable).with_name("mergekit-yaml")), str(mergekit_config),
                          str(scratch / f"mergekit-{method}"), "--no-copy-tokenizer", "--quiet"])
            config = {"base": str(base), "merge": ours, "parameters": params,
                      "models": [{"path": str(f), "lambda": 1 / 3} for f in finetunes]}
            spec = json.dumps({"config": config, "out": str(scratch / f"ours-{method}")})
            mine = run([sys.executable, "-c", OURS, spec])
            rows.append((method, floor, theirs, mine))
    finally:
        subprocess.run(["rm", "-rf", str(scratch)], check=False)
    load_after = os.getloadavg()

    lines = [
        f"## compose ({date.today().isoformat()})",
        "",
        f"- command: `python benchmarks/compose.py --hidden {args.hidden} --layers {args.layers}`",
        *([f"- code: {args.code}"] if args.code else []),
        f"- load: load average (1/5/15 min) {'/'.join(f'{v:.1f}' for v in load_before)} at the start, "
        f"{'/'.join(f'{v:.1f}' for v in load_after)} at the end",
        f"- machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, warm page cache",
        f"- models: LLaMA {parameters / 1e9:.2f}B parameters, bf16; base + 3 fine-tunes; lambda 1/3",
        "",
        "| method | I/O floor s | mergekit s | mmcompose s | time vs mergekit | time vs floor "
        "| mergekit RssAnon MiB | mmcompose RssAnon MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for method, floor, theirs, mine in rows:
        lines.append(f"| {method} | {floor:.1f} | {theirs['seconds']:.1f} | {mine['seconds']:.1f} "
                     f"| {mine['seconds'] / theirs['seconds']:.2f}x | {mine['seconds'] / floor:.2f}x "
                     f"| {theirs['rss_anon_mib']:.0f} | {mine['rss_anon_mib']:.0f} |")
    publish(lines, args.results)


if __name__ == "__main__":
    main()
