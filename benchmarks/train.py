"""Training cost of `mmcompose train` on this CPU, against a plain transformers + PEFT LoRA loop in the same run.

(a) tokens/s: the same ~100M-parameter random LLaMA (hidden 768, 14 layers, local BPE tokenizer), the same LoRA
    (rank 16, alpha 32 on q,k,v,o,gate,up,down), the same batches of text-only conversations, fp32, AdamW.
    mmcompose: `trainer.train` with a `shared` delta (the routed layers with one delta serve every token);
    anchor: `peft.get_peft_model` + a hand-written loop (forward with labels, backward, AdamW step). Tokens are
    the non-padding positions of each batch; the first step of each run is a warm-up and is not timed
    (mmcompose's per-step times come from its log, `seconds` at each step). Repeats are interleaved.
(b) peak RSS of a `train modality` run over a 1k-sample and a 50k-sample data file that reference the same 32
    PNG files (tiny model, 3 steps): the lazy loader must not grow with the file beyond its sample records.
(c) peak RSS saved by gradient checkpointing on the 100M model (batch 4 x 256 tokens, 2 steps), and its time cost.
(d) seconds of a demo-sized video instruction run (a small world's 512 video samples, 8-frame MP4s, LLaMA of the
    demo's small shape with random weights, `shared` rank 16, batch 16, 3 epochs) keeping decoded inputs in
    memory, against decoding every input every time (the anchor; `KEEP_DECODED_BYTES` 0). Interleaved repeats.

Each RSS number is the child process's VmHWM (it includes the interpreter, torch and the model).
Run: `python benchmarks/train.py [--repeats 3] [--steps 4] [--parts abcd]`; prints a table and appends it to
RESULTS.md (`--parts b`: only the RSS comparison).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "2")

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from report import publish
from transformers import LlamaConfig, LlamaForCausalLM

ROOT = Path(__file__).resolve().parent
SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
WORDS = ["the", "red", "blorvin", "lives", "in", "the", "desert", "and", "eats", "small", "quonks", "while",
         "the", "blue", "zeppa", "sings", "near", "the", "cave", "every", "morning", "before", "the", "sea",
         "wind", "turns", "cold"]


def make_base(directory: Path, hidden: int, layers: int, intermediate: int) -> Path:
    from mmcompose.train.tokenizer import train_tokenizer

    tokenizer = train_tokenizer([" ".join(WORDS)] * 50 + ["USER: ASSISTANT: A. B. C. D."] * 20, vocab_size=512)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=12 if hidden % 12 == 0 else 4,
                         num_key_value_heads=12 if hidden % 12 == 0 else 4, max_position_embeddings=2048,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def conversations(count: int, words: int, seed: int = 0) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    return [{"id": f"s{i}", "modal_inputs": {}, "conversations": [
        {"from": "human", "value": " ".join(rng.choice(WORDS, 12))},
        {"from": "gpt", "value": " ".join(rng.choice(WORDS, words))}]} for i in range(count)]


# --- (a) tokens/s -----------------------------------------------------------------------------------------


def mmcompose_run(base: Path, samples: list[dict[str, Any]], steps: int, batch: int, out: Path) -> float:
    from mmcompose.data.dataset import SampleDataset, training_samples
    from mmcompose.train.trainer import LearningRates, TrainConfig, build_model, train

    model = build_model(base, ["image"], strategy="shared", rank=16, alpha=32.0, target_modules=SEVEN, seed=0)
    config = TrainConfig(stage="instruct", batch_size=batch, steps=steps, lr=LearningRates(deltas=1e-4),
                         warmup_ratio=0.0, log_every=1, group_by_length=False, train_encoder=False)
    out.mkdir(parents=True, exist_ok=True)
    train(model, samples, out, config, out / "run", progress=False)
    log = [json.loads(line) for line in (out / "run" / "log.jsonl").read_text().splitlines()]
    data = SampleDataset(model, training_samples(samples, out, model).samples)
    with torch.no_grad():  # every sample once (one epoch); the answers have equal word counts
        tokens = int(model.assemble([data[i] for i in range(len(data))]).attention_mask.sum())
    return tokens * (steps - 1) / steps / (log[-1]["seconds"] - log[0]["seconds"])


def peft_run(base: Path, samples: list[dict[str, Any]], steps: int, batch: int) -> float:
    """The anchor: the same conversations as input ids (BOS + vicuna-free plain prompt + target + EOS), labels
    on the target, right padding, PEFT LoRA on the same modules, AdamW at the same rate."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer

    from mmcompose.model.conversation import format_conversation

    tokenizer = AutoTokenizer.from_pretrained(base)
    llm = LlamaForCausalLM.from_pretrained(base)
    torch.manual_seed(0)
    model = get_peft_model(llm, LoraConfig(r=16, lora_alpha=32, target_modules=SEVEN, lora_dropout=0.0))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    rows = []
    for sample in samples:
        prompt, target = format_conversation(sample["conversations"])
        ids = [tokenizer.bos_token_id, *tokenizer(prompt, add_special_tokens=False)["input_ids"]]
        answer = [*tokenizer(target, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
        rows.append((ids + answer, [-100] * len(ids) + answer))
    model.train()
    times = []
    for step in range(steps):
        chosen = rows[(step * batch) % len(rows):][:batch]
        width = max(len(ids) for ids, _ in chosen)
        input_ids = torch.tensor([ids + [0] * (width - len(ids)) for ids, _ in chosen])
        labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in chosen])
        mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in chosen])
        started = time.perf_counter()
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append((time.perf_counter() - started, int(mask.sum())))
    timed = times[1:]
    return sum(n for _, n in timed) / sum(t for t, _ in timed)


# --- (b), (c): child processes reporting their peak RSS -------------------------------------------------------


def child(arguments: list[str]) -> dict[str, Any]:
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT.parent / "src"), str(ROOT)])}
    result = subprocess.run([sys.executable, __file__, *arguments], capture_output=True, text=True, check=False,
                            env=environment, timeout=1800)
    if result.returncode:
        raise SystemExit(f"child {arguments} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def rss_worker(kind: str, base: Path, data: Path, out: Path, checkpointing: bool) -> None:
    from mmcompose.cli import app

    arguments = ["train", "modality", "--base", str(base), "--data", str(data), "--data-root", str(data.parent),
                 "-o", str(out), "--mixed-precision", "no"]
    if kind == "data":
        arguments += ["--modality", "image", "--stage", "pretrain", "--steps", "3", "--batch-size", "4",
                      "--encoder", 'image=image-patch:{"image_size": 32, "patch_size": 8, "width": 32, '
                                   '"depth": 1, "heads": 2}']
    else:
        arguments += ["--modality", "image", "--stage", "instruct", "--strategy", "shared", "--rank", "16",
                      "--steps", "2", "--batch-size", "4", "--gradient-checkpointing" if checkpointing
                      else "--no-gradient-checkpointing"]
    started = time.perf_counter()
    try:
        app(arguments, standalone_mode=False)
    finally:
        peak = peak_rss_mib()
    print(json.dumps({"peak_mib": peak, "seconds": time.perf_counter() - started}))


def peak_rss_mib() -> float:
    """This process's peak resident set (VmHWM). Not ru_maxrss: Linux keeps that across fork and exec, so a
    child would report its parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise SystemExit("no VmHWM in /proc/self/status (Linux only)")


def image_data(directory: Path, count: int, files: int = 32) -> Path:
    images = directory / "images"
    if not images.is_dir():
        images.mkdir(parents=True)
        rng = np.random.default_rng(0)
        for index in range(files):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(images / f"{index}.png")
    path = directory / f"data-{count}.json"
    rng = np.random.default_rng(1)
    samples = [{"id": f"s{i}", "modal_inputs": {"image": [f"images/{i % files}.png"]}, "conversations": [
        {"from": "human", "value": "<image>\nDescribe it."},
        {"from": "gpt", "value": " ".join(rng.choice(WORDS, 8))}]} for i in range(count)]
    path.write_text(json.dumps(samples))
    return path


def video_run(base: Path, world: Path, out: Path, keep: bool) -> float:
    """Seconds of `train` over the world's video instruction set (3 epochs), keeping decoded inputs or not."""
    from mmcompose.data import names
    from mmcompose.data.dataset import load_training_samples
    from mmcompose.train import trainer

    model = trainer.build_model(base, ["video"], strategy="shared", rank=16, alpha=32.0, seed=0)
    loaded = load_training_samples([world / names.DATA_DIR / names.instruct_file("video")], world, model)
    config = trainer.TrainConfig(stage="instruct", batch_size=16, steps=3 * (len(loaded.samples) // 16), seed=0,
                                 train_encoder=False, lr=trainer.LearningRates(connector=1e-4, deltas=3e-3))
    kept, trainer.KEEP_DECODED_BYTES = trainer.KEEP_DECODED_BYTES, trainer.KEEP_DECODED_BYTES if keep else 0
    try:
        started = time.perf_counter()
        trainer.train(model, loaded.samples, world, config, out, progress=False)
        return time.perf_counter() - started
    finally:
        trainer.KEEP_DECODED_BYTES = kept


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.0f} ({min(values):.0f}-{max(values):.0f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--results", type=Path, default=ROOT / "RESULTS.md")
    parser.add_argument("--parts", default="abcd", help="which measurements to run: any of a, b, c, d")
    parser.add_argument("--worker", nargs=5, metavar=("KIND", "BASE", "DATA", "OUT", "CHECKPOINTING"))
    args = parser.parse_args()
    if args.worker:
        kind, base, data, out, checkpointing = args.worker
        rss_worker(kind, Path(base), Path(data), Path(out), checkpointing == "1")
        return
    parts = set(args.parts)
    if not parts or parts - set("abcd"):
        raise SystemExit(f"--parts {args.parts!r}: choose letters among a, b, c, d")
    load_before = os.getloadavg()
    lines = ["| measure | mmcompose | anchor | ratio |", "|---|---|---|---|"]
    model_line = ""
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        if parts & {"a", "c"}:
            big = make_base(work / "base-100m", hidden=768, layers=14, intermediate=2048)
            parameters = sum(p.numel() for p in LlamaForCausalLM.from_pretrained(big).parameters())
            model_line = (f"- model: random LLaMA, {parameters / 1e6:.0f}M parameters (hidden 768, 14 layers), LoRA "
                          f"rank 16 / alpha 32 on the 7 projections, fp32, AdamW, batch {args.batch} x 12-word prompts "
                          f"and 100-word answers ({args.steps} steps); first step of each run untimed")
        if "a" in parts:
            samples = conversations(args.batch * args.steps, words=100)
            ours, anchor = [], []
            for repeat in range(args.repeats):
                ours.append(mmcompose_run(big, samples, args.steps, args.batch, work / f"mm-{repeat}"))
                anchor.append(peft_run(big, samples, args.steps, args.batch))
            ratio = statistics.median(ours) / statistics.median(anchor)
            lines.append(f"| (a) training tokens/s | {spread(ours)} | {spread(anchor)} (transformers + PEFT loop) "
                         f"| {ratio:.2f}x |")
        if "b" in parts:
            tiny = make_base(work / "base-tiny", hidden=64, layers=2, intermediate=128)
            rss = {count: [child(["--worker", "data", str(tiny), str(image_data(work / "media", count)),
                                  str(work / f"rss-{count}-{r}"), "0"])["peak_mib"] for r in range(args.repeats)]
                   for count in (1000, 50000)}
            lines.append(f"| (b) peak RSS MiB, 1k vs 50k samples, same 32 PNGs | 50k: {spread(rss[50000])} | 1k: "
                         f"{spread(rss[1000])} | {statistics.median(rss[50000]) / statistics.median(rss[1000]):.2f}x |")
        if "c" in parts:
            long_data = work / "media" / "long.json"
            long_data.parent.mkdir(parents=True, exist_ok=True)
            rng = np.random.default_rng(2)
            long_data.write_text(json.dumps([{"id": f"l{i}", "modal_inputs": {"image": [f"images/{i % 32}.png"]},
                                              "conversations": [{"from": "human", "value": "<image>\nTell me."},
                                                                {"from": "gpt",
                                                                 "value": " ".join(rng.choice(WORDS, 240))}]}
                                             for i in range(8)]))
            image_data(work / "media", 8)  # the PNGs it names
            checkpointing = {flag: [child(["--worker", "ckpt", str(big), str(long_data),
                                           str(work / f"gc-{flag}-{r}"), str(int(flag))]) for r in range(args.repeats)]
                             for flag in (False, True)}
            memory = {flag: [r["peak_mib"] for r in runs] for flag, runs in checkpointing.items()}
            seconds = {flag: [r["seconds"] for r in runs] for flag, runs in checkpointing.items()}
            lines.append(f"| (c) peak RSS MiB, gradient checkpointing on vs off (batch 4 x ~250 tokens, 100M model) "
                         f"| on: {spread(memory[True])} | off: {spread(memory[False])} | saves "
                         f"{statistics.median(memory[False]) - statistics.median(memory[True]):.0f} MiB; run time "
                         f"{statistics.median(seconds[True]) / statistics.median(seconds[False]):.2f}x |")
        if "d" in parts:
            from mmcompose.world import build_world

            world = build_world(0, work / "world", "small")
            small = make_base(work / "base-small", hidden=128, layers=3, intermediate=344)
            runs: dict[bool, list[float]] = {True: [], False: []}
            for repeat in range(args.repeats):
                for keep in (True, False):
                    runs[keep].append(video_run(small, world, work / f"video-{keep}-{repeat}", keep))
            lines.append(f"| (d) seconds, video instruction run (3 epochs), decoded inputs kept vs decoded every time "
                         f"| kept: {spread(runs[True])} | every time: {spread(runs[False])} | "
                         f"{statistics.median(runs[False]) / statistics.median(runs[True]):.2f}x faster |")
    load_after = os.getloadavg()
    header = [
        f"## train ({date.today().isoformat()})",
        "",
        f"- command: `python benchmarks/train.py --repeats {args.repeats} --steps {args.steps} --batch {args.batch} "
        f"--parts {args.parts}`",
        f"- machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}; load average "
        f"{load_before[0]:.1f} at the start, {load_after[0]:.1f} at the end",
        *([model_line] if model_line else []),
        f"- values: median (min-max) over {args.repeats} repeats",
        "",
    ]
    publish(header + lines, args.results)


if __name__ == "__main__":
    main()
