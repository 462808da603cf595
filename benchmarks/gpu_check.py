"""The GPU check: the vicuna-7b-shaped composed four-modality system, random weights in bf16, on one GPU (and on
several, and in 4 bits, where the machine allows), in one command with no downloads.

    python benchmarks/gpu_check.py                      # one 80 GB GPU: ~20 GiB written to a temporary dir
    python benchmarks/gpu_check.py --system /data/rs32  # reuse a system written by realscale.py
    python benchmarks/gpu_check.py --device cpu --tiny  # the reduced form CI runs (seconds)

The system is `benchmarks/realscale.py`'s (written first, random values drawn on the device), loaded with
`MultimodalLLM.from_pretrained(..., device=, dtype=bfloat16)`. Checks, one table at the end:

(a) agreement: greedy decoding of a few prompts (text, and one with all four media) on the device and by the
    same checkpoint loaded on the CPU. Logits are compared at every step both runs share; where the two
    greedy choices differ, the CPU's logits must put the two tokens within the tolerance of each other (a
    near-tie, which bf16 kernels on different hardware may break either way), after which the prompt stops
    being compared. Any other difference fails the check and the script exits 1.
(b) decode tokens/s of the folded model (the serving path) against transformers' `generate` on the bare base
    LLM, same device, same run, same prompt length; median interval between successive tokens.
(c) `eval` items/s on a synthetic MCUB-4-shaped file (four media per item), greedy, batch size 1.
(d) `serve`: the real app under uvicorn on loopback, 1 and 16 concurrent clients, `max_tokens` bounded.
(e) peak device memory (`torch.cuda.max_memory_allocated`), or peak RSS on the CPU.
(f) with 2 or more GPUs: agreement and decode again with `device_map="auto"`.
(g) 4-bit base weights (`quantize="4bit"`, NF4 through bitsandbytes) where mmcompose's own check says they can
    run on the device: decode tokens/s, memory, and how many greedy tokens match the bf16 CPU reference before
    the first difference (reported, not judged: quantization changes the numbers).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import itertools
import json
import socket
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from realscale import FULL, TINY, write_mcub, write_system
from transformers import AutoModelForCausalLM, StoppingCriteria, StoppingCriteriaList

from mmcompose.errors import MMComposeError
from mmcompose.eval.predict import model_predictor
from mmcompose.eval.presets import get_preset, load_preset_tasks
from mmcompose.eval.runner import default_num_workers, run_benchmark
from mmcompose.model import Example, MultimodalLLM
from mmcompose.model.generation import prefill, step

PROMPTS = ["Describe a cat in one sentence.", "What is the capital of France?",
           "List three colours and explain why you like them."]


@dataclass
class Row:
    check: str
    result: str
    detail: str = ""
    ok: bool = True


# --- (a) agreement ------------------------------------------------------------------------------------------
@torch.no_grad()
def greedy_with_logits(model: MultimodalLLM, example: Example, new_tokens: int) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens and the float32 logits each was chosen from, on the CPU: the loop of
    `MultimodalLLM.generate` (same prefill and step), without stopping at EOS."""
    state, logits = prefill(model, model.assemble([example], padding_side="left"))
    tokens, history = [], []
    for count in range(new_tokens):
        history.append(logits[0].cpu())
        token = logits.argmax(-1)
        tokens.append(int(token))
        if count + 1 < new_tokens:
            logits = step(model, state, token)
    return tokens, torch.stack(history)


def compare(device_run: tuple[list[int], torch.Tensor], reference_run: tuple[list[int], torch.Tensor],
            tolerance: float) -> tuple[bool, str, float]:
    """Whether a device's greedy run agrees with the reference's (see (a) in the module docstring); a short
    account; the largest logit difference over the shared steps, as a fraction of the reference's logit range."""
    (tokens, logits), (ref_tokens, ref_logits) = device_run, reference_run
    worst = 0.0
    for index, (token, ref_token) in enumerate(zip(tokens, ref_tokens, strict=True)):
        scale = float(ref_logits[index].max() - ref_logits[index].min()) or 1.0
        worst = max(worst, float((logits[index] - ref_logits[index]).abs().max()) / scale)
        if token != ref_token:
            gap = float(ref_logits[index, ref_token] - ref_logits[index, token]) / scale
            if gap > tolerance or worst > tolerance:
                return False, f"token {index}: {token} vs {ref_token} (reference gap {gap:.3f} of its range)", worst
            return True, f"same {index}/{len(tokens)}, then a near-tie (gap {gap:.4f})", worst
    if worst > tolerance:
        return False, f"same tokens, logits differ by {worst:.3f} of their range", worst
    return True, f"same {len(tokens)}/{len(tokens)}", worst


def prompts(model: MultimodalLLM, system: Path) -> list[Example]:
    """The text prompts, and one MCUB-4 question with its four media."""
    examples = [model.example(model.format_conversation([{"from": "human", "value": text}])[0])
                for text in PROMPTS]
    item = json.loads((system / "mcub" / "MCUB-4.json").read_text())[0]
    inputs = {m: [str(system / "mcub" / path) for path in paths] for m, paths in item["modal_inputs"].items()}
    examples.append(model.conversation_example(item["conversations"], inputs))
    return examples


# --- (b) decode speed ---------------------------------------------------------------------------------------
class TokenClock(StoppingCriteria):
    """Never stops `generate`; records when each token was produced."""

    def __init__(self, times: list[float], sync: Callable[[], None]) -> None:
        self.times, self.sync = times, sync

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        self.sync()
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def tokens_per_second(times: list[float]) -> float:
    return 1.0 / statistics.median(b - a for a, b in itertools.pairwise(times))


def ours_decode(model: MultimodalLLM, example: Example, new_tokens: int, sync: Callable[[], None]) -> float:
    times: list[float] = []

    def clock(row: int, token: int) -> None:
        sync()
        times.append(time.perf_counter())

    eos = model.tokenizer.eos_token_id
    model.tokenizer.eos_token_id = None  # a random model may pick EOS early; time every step
    try:
        model.generate([example], max_new_tokens=new_tokens, on_token=clock)
    finally:
        model.tokenizer.eos_token_id = eos
    return tokens_per_second(times)


def hf_decode(base: Path, device: str, prompt_ids: torch.Tensor, new_tokens: int,
              sync: Callable[[], None]) -> float:
    llm = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16, device_map=device,
                                               local_files_only=True).eval()
    times: list[float] = []
    with torch.no_grad():
        llm.generate(prompt_ids.to(device), attention_mask=torch.ones_like(prompt_ids).to(device),
                     max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                     stopping_criteria=StoppingCriteriaList([TokenClock(times, sync)]), pad_token_id=0)
    del llm
    return tokens_per_second(times)


# --- (d) serve ----------------------------------------------------------------------------------------------
def serve_clients(model: MultimodalLLM, clients: list[int], max_tokens: int) -> dict[int, tuple[float, float]]:
    """The real app under uvicorn on a free loopback port; for each count, that many concurrent chat requests.
    Returns {count: (requests/s, completion tokens/s)}."""
    import uvicorn

    from mmcompose.serve.app import ServerConfig, create_app

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(model, ServerConfig(model_id="composed", max_batch=16)),
                                           host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while not server.started:
        if time.time() > deadline or not thread.is_alive():
            raise RuntimeError("the server did not start")
        time.sleep(0.05)
    results = {}
    try:
        for count in clients:
            started = time.perf_counter()
            tokens = concurrent_requests(url, count, max_tokens)
            elapsed = time.perf_counter() - started
            results[count] = (count / elapsed, tokens / elapsed)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
    return results


def concurrent_requests(url: str, count: int, max_tokens: int) -> int:
    """`count` chat requests at once, one thread each; the completion tokens of all, or an error if any failed."""
    tokens: list[int] = []
    errors: list[str] = []

    def one(index: int) -> None:
        body = json.dumps({"model": "composed", "max_tokens": max_tokens, "temperature": 0,
                           "messages": [{"role": "user", "content": PROMPTS[index % len(PROMPTS)]}]})
        request = urllib.request.Request(f"{url}/v1/chat/completions", data=body.encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            answer = json.loads(urllib.request.urlopen(request, timeout=600).read())
            tokens.append(answer["usage"]["completion_tokens"])
        except OSError as error:
            errors.append(str(error))

    workers = [threading.Thread(target=one, args=(i,)) for i in range(count)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    if errors:
        raise RuntimeError(f"{len(errors)} of {count} requests failed: {errors[0]}")
    return sum(tokens)


# --- the run ------------------------------------------------------------------------------------------------
class Device:
    """Synchronisation and peak-memory accounting for the device under test."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.cuda = name.startswith("cuda")

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def reset_peak(self) -> None:
        if self.cuda:
            for index in range(torch.cuda.device_count()):
                torch.cuda.reset_peak_memory_stats(index)

    def peak(self) -> str:
        if self.cuda:
            peaks = [torch.cuda.max_memory_allocated(i) / 2**30 for i in range(torch.cuda.device_count())]
            return ", ".join(f"cuda:{i} {p:.2f} GiB" for i, p in enumerate(peaks) if p)
        with open("/proc/self/status") as handle:
            high = next(int(line.split()[1]) for line in handle if line.startswith("VmHWM"))
        return f"peak RSS {high / 2**20:.2f} GiB (process)"


def load(system: Path, **options: Any) -> MultimodalLLM:
    return MultimodalLLM.from_pretrained(system / "composed", dtype=torch.bfloat16, **options).eval()


def check(args: argparse.Namespace, system: Path) -> list[Row]:
    device = Device(args.device)
    rows: list[Row] = []
    device.reset_peak()
    started = time.perf_counter()
    model = load(system, device=args.device)
    device.sync()
    rows.append(Row("load", f"{time.perf_counter() - started:.1f} s", f"bf16 on {args.device}"))
    peaks = {"load": device.peak()}
    examples = prompts(model, system)

    # (a)
    runs = [greedy_with_logits(model, example, args.new_tokens) for example in examples]
    peaks["(a)"] = device.peak()
    reference = load(system, device="cpu")
    if args.perturb_reference:  # the self-test of this check: a reference that must disagree
        head = reference.llm.get_output_embeddings().weight
        with torch.no_grad():
            head.copy_(head.roll(1, dims=0))
    reference_runs = [greedy_with_logits(reference, example, args.new_tokens)
                      for example in prompts(reference, system)]
    del reference
    gc.collect()
    agreement = [compare(run, ref, args.tolerance) for run, ref in zip(runs, reference_runs, strict=True)]
    agree = all(ok for ok, _, _ in agreement)
    worst = max(w for _, _, w in agreement)
    rows.append(Row("(a) greedy vs CPU", "agree" if agree else "DISAGREE",
                    f"{len(examples)} prompts x {args.new_tokens} tokens; worst logit difference {worst:.4f} of "
                    f"range; " + "; ".join(account for _, account, _ in agreement), ok=agree))
    if args.only_agreement:
        return rows

    # (b)
    model.fold_text_route()
    text = examples[0]
    ours = ours_decode(model, text, args.decode_tokens, device.sync)
    prompt_ids = model.tokenizer(text.prompt, return_tensors="pt").input_ids
    theirs = hf_decode(system / "base", args.device, prompt_ids, args.decode_tokens, device.sync)
    rows.append(Row("(b) decode tok/s", f"{ours:.1f} vs {theirs:.1f} ({ours / theirs:.3f}x)",
                    f"folded composed model vs transformers generate on the bare base, {args.decode_tokens} tokens"))

    # (c)
    device.reset_peak()  # (b)'s bare base is gone; from here on the device holds only the composed model
    tiny = json.loads((system / "system.json").read_text())["tiny"]
    with tempfile.TemporaryDirectory() as scratch:
        write_mcub(Path(scratch) / "mcub", TINY if tiny else FULL, seed=1, items=args.eval_items)
        preset = get_preset("mcub")
        samples = load_preset_tasks(preset, Path(scratch) / "mcub", None)["MCUB-4"]
        started = time.perf_counter()
        run_benchmark(samples, model_predictor(model, preset.max_new_tokens), Path(scratch) / "out", "MCUB-4",
                      preset.kind, progress=False, scorer=preset.scorer, batch_size=args.eval_batch,
                      num_workers=default_num_workers())
        elapsed = time.perf_counter() - started
    rows.append(Row("(c) eval items/s", f"{len(samples) / elapsed:.2f}",
                    f"{len(samples)} MCUB-4-shaped items, four media each, batch {args.eval_batch}, up to "
                    f"{preset.max_new_tokens} new tokens, as `mmcompose eval --benchmark mcub`"))

    # (d)
    served = serve_clients(model, [1, 16], args.serve_tokens)
    for count, (requests, tokens) in served.items():
        rows.append(Row(f"(d) serve, {count} client{'s' * (count > 1)}", f"{tokens:.1f} tok/s",
                        f"{requests:.2f} requests/s, max_tokens {args.serve_tokens}"))

    # (e)
    peaks["(c)+(d)"] = device.peak()
    rows.append(Row("(e) peak memory", peaks["(c)+(d)"], "; ".join(f"{step}: {peak}" for step, peak in peaks.items())
                    + ("" if device.cuda else "; the process's peak, the CPU reference included")))
    del model
    gc.collect()

    # (f)
    if device.cuda and torch.cuda.device_count() >= 2:
        device.reset_peak()
        split = load(system, device_map="auto")
        split_runs = [greedy_with_logits(split, example, args.new_tokens) for example in prompts(split, system)]
        agreement = [compare(run, ref, args.tolerance) for run, ref in zip(split_runs, reference_runs, strict=True)]
        ok = all(a for a, _, _ in agreement)
        split.fold_text_route()
        rate = ours_decode(split, examples[0], args.decode_tokens, device.sync)
        rows.append(Row("(f) device_map auto", "agree" if ok else "DISAGREE",
                        f"{torch.cuda.device_count()} GPUs; decode {rate:.1f} tok/s; {device.peak()}", ok=ok))
        del split
        gc.collect()
    else:
        rows.append(Row("(f) device_map auto", "skipped", "needs 2 or more GPUs"))

    # (g)
    reason = quantization_unavailable(device)
    if reason is None:
        device.reset_peak()
        quantized = load(system, device=args.device, quantize="4bit")
        quantized_runs = [greedy_with_logits(quantized, example, args.new_tokens)
                          for example in prompts(quantized, system)]
        same = sum(common_prefix(q[0], r[0]) for q, r in zip(quantized_runs, reference_runs, strict=True))
        rate = ours_decode(quantized, examples[0], args.decode_tokens, device.sync)
        rows.append(Row("(g) 4-bit", f"{rate:.1f} tok/s", f"{device.peak()}; {same}/{len(examples) * args.new_tokens} "
                        f"greedy tokens as the bf16 CPU reference before the first difference (not judged)"))
    else:
        rows.append(Row("(g) 4-bit", "skipped", reason))
    return rows


def common_prefix(first: list[int], second: list[int]) -> int:
    return next((i for i, (a, b) in enumerate(zip(first, second, strict=True)) if a != b), len(first))


def quantization_unavailable(device: Device) -> str | None:
    """Why 4-bit cannot run here, or None: mmcompose's own check (bitsandbytes installed, and a tiny NF4 layer
    quantized and run on this device)."""
    if importlib.util.find_spec("mmcompose.model.quantize") is None:
        return "this mmcompose has no quantization (mmcompose.model.quantize)"
    from mmcompose.model.quantize import check_quantize

    try:
        check_quantize("4bit", torch.bfloat16, device.name)
    except MMComposeError as error:
        return str(error)
    return None


def table(rows: list[Row]) -> str:
    widths = [max(len(getattr(r, f)) for r in rows) for f in ("check", "result")]
    lines = [f"{'check':<{widths[0]}}  {'result':<{widths[1]}}  detail"]
    lines += [f"{r.check:<{widths[0]}}  {r.result:<{widths[1]}}  {r.detail}" for r in rows]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="Tiny widths (the CPU test's form).")
    parser.add_argument("--layers", type=int, default=None, help="Decoder layers (default 32; 2 with --tiny).")
    parser.add_argument("--system", type=Path, help="A system written by realscale.py (else one is written).")
    parser.add_argument("--new-tokens", type=int, default=12, help="Greedy tokens compared per prompt in (a).")
    parser.add_argument("--decode-tokens", type=int, default=64, help="Tokens timed in (b).")
    parser.add_argument("--eval-items", type=int, default=8, help="MCUB-4-shaped items in (c).")
    parser.add_argument("--eval-batch", type=int, default=8, help="Batch size in (c).")
    parser.add_argument("--serve-tokens", type=int, default=32, help="max_tokens of each request in (d).")
    parser.add_argument("--tolerance", type=float, default=0.05,
                        help="(a): largest logit difference, and largest reference gap at a tie, as a fraction "
                             "of the reference's logit range.")
    parser.add_argument("--only-agreement", action="store_true", help="Stop after (a).")
    parser.add_argument("--perturb-reference", action="store_true",
                        help="Self-test: shift the CPU reference's output rows, so that (a) must fail.")
    args = parser.parse_args()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        system = args.system
        if system is None:
            system = write_system(Path(scratch) / "system", layers=args.layers or (2 if args.tiny else 32), seed=0,
                                  tiny=args.tiny, shard_bytes=2 * 2**30, overwrite=False,
                                  device=args.device if args.device.startswith("cuda") else "cpu")
        rows = check(args, system)
    rows.append(Row("total", f"{time.perf_counter() - started:.0f} s", f"device {args.device}"))
    print(table(rows))
    return 0 if all(row.ok for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
