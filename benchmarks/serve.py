"""Serving throughput: `mmcompose serve` on loopback under 1, 4 and 16 concurrent clients.

The server is the real command (`mmcompose serve CKPT --max-batch 16`) in a subprocess on 127.0.0.1 and an
ephemeral port. Without `--checkpoint`, the script first makes a demo-sized checkpoint: the demo's small
base LLM shape (LLaMA, hidden 128, 3 layers, vocabulary 480, random weights) with image, audio and point
branches composed DAMC-style (decoupled deltas, random values). Each client sends, one after another,
a chat completion with a PNG and a question (`max_tokens` 32, greedy), for `--seconds` per level; requests
still in flight at the end are waited for and counted. Reports requests/s, generated tokens/s (from the
responses' `usage`), p50/p95 latency and errors (must be 0), and the tokens/s ratio to one client.
Run: `python benchmarks/serve.py`.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch
from fixtures import randomize_deltas
from PIL import Image
from report import publish
from transformers import LlamaConfig, LlamaForCausalLM

from mmcompose.checkpoint import save_checkpoint
from mmcompose.model import MultimodalLLM, modality_spec
from mmcompose.train.tokenizer import train_tokenizer

QUESTIONS = ["What is in this picture?", "Which habitat does it live in?", "What colour is it?",
             "Is it large or small?", "Describe it in a few words."]


def make_checkpoint(directory: Path) -> Path:
    tokenizer = train_tokenizer([f"the zeppa number {i} lives in the desert and is red ." for i in range(3000)],
                                vocab_size=480)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=344, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory / "base")
    tokenizer.save_pretrained(directory / "base")
    model = MultimodalLLM.from_base(directory / "base", [modality_spec(m) for m in ("image", "audio", "point")],
                                    strategy="decoupled", rank=16, alpha=32.0)
    randomize_deltas(model)
    return save_checkpoint(model, directory / "composed")


def png_url(seed: int) -> str:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def post(port: int, body: dict, timeout: float) -> tuple[int, dict]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("POST", "/v1/chat/completions", body=json.dumps(body),
                           headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def run_level(port: int, clients: int, seconds: float, max_tokens: int, images: list[str]) -> dict:
    latencies: list[float] = []
    tokens: list[int] = []
    errors: list[str] = []
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def client(number: int) -> None:
        sent = 0
        while time.monotonic() < stop_at:
            body = {"messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": images[(number + sent) % len(images)]}},
                {"type": "text", "text": QUESTIONS[(number + sent) % len(QUESTIONS)]}]}],
                "max_tokens": max_tokens}
            sent += 1
            start = time.monotonic()
            try:
                status, reply = post(port, body, timeout=120)
            except OSError as error:
                with lock:
                    errors.append(f"{type(error).__name__}: {error}")
                continue
            with lock:
                if status == 200:
                    latencies.append(time.monotonic() - start)
                    tokens.append(reply["usage"]["completion_tokens"])
                else:
                    errors.append(f"{status}: {reply}")

    started = time.monotonic()
    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - started
    ordered = sorted(latencies)
    return {"clients": clients, "requests": len(latencies), "seconds": elapsed,
            "requests_per_s": len(latencies) / elapsed, "tokens_per_s": sum(tokens) / elapsed,
            "p50": statistics.median(ordered) if ordered else float("nan"),
            "p95": ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))] if ordered else float("nan"),
            "errors": len(errors), "first_error": errors[0] if errors else ""}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, help="serve this checkpoint instead of a generated one")
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--seconds", type=float, default=20.0, help="load duration per level")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--results", type=Path, default=Path(__file__).with_name("RESULTS.md"))
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        checkpoint = args.checkpoint or make_checkpoint(Path(scratch))
        port = free_port()
        command = [sys.executable, "-m", "mmcompose.cli", "serve", str(checkpoint), "--port", str(port),
                   "--max-batch", str(args.max_batch)]
        server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 120
            while True:
                if server.poll() is not None:
                    raise SystemExit(f"the server exited: {server.stderr.read()[-2000:]}")
                try:
                    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                    connection.request("GET", "/health")
                    if connection.getresponse().status == 200:
                        break
                except OSError:
                    if time.monotonic() > deadline:
                        raise SystemExit("the server did not start within 120 s") from None
                    time.sleep(0.2)
            images = [png_url(seed) for seed in range(8)]
            run_level(port, 2, 3.0, args.max_tokens, images)  # warm-up
            levels = [run_level(port, clients, args.seconds, args.max_tokens, images) for clients in args.levels]
        finally:
            server.terminate()
            server.wait(timeout=30)

    single = levels[0]["tokens_per_s"]
    lines = [
        f"## serve ({date.today().isoformat()})",
        "",
        f"- command: `python benchmarks/serve.py --seconds {args.seconds:g} --max-tokens {args.max_tokens} "
        f"--max-batch {args.max_batch}`" + (f" --checkpoint {args.checkpoint}" if args.checkpoint else ""),
        f"- machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, load average "
        f"{os.getloadavg()[0]:.1f} at the end; server and clients on loopback",
        "- model: " + ("the given checkpoint" if args.checkpoint else
                       "demo-sized LLaMA (hidden 128, 3 layers, vocabulary 480), image+audio+point DAMC, random "
                       "weights") + "; each request a 64x64 PNG and a question, greedy",
        "",
        "| clients | requests | requests/s | generated tok/s | vs 1 client | p50 latency s | p95 latency s | errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for level in levels:
        lines.append(f"| {level['clients']} | {level['requests']} | {level['requests_per_s']:.2f} "
                     f"| {level['tokens_per_s']:.1f} | {level['tokens_per_s'] / single:.2f}x | {level['p50']:.2f} "
                     f"| {level['p95']:.2f} | {level['errors']} |")
    failures = [level["first_error"] for level in levels if level["errors"]]
    if failures:
        lines += ["", f"First error: {failures[0]}"]
    publish(lines, args.results)


if __name__ == "__main__":
    main()
