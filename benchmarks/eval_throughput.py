"""`mmcompose eval` throughput on the demo's MCUB-4: items/s of two versions of the code, interleaved.

What is measured: `run_benchmark` as the `eval` command runs it (the checkpoint loaded, `model_predictor`
with the command's 16 new tokens, batches of 16, fresh output directory), timed from the first sample to the
metrics file, on the small world's `mcub4_test.json` (60 items, each an image PNG, a WAV, an 8-frame MP4 and a
point-cloud NPY). Loading the model is not timed. The model is untrained but has the demo's composed shape:
the small base profile's LLaMA (hidden 128, 3 layers, the world's 480-token tokenizer) with random weights,
the four built-in modalities with their registered encoders, 5 prefix + 5 suffix boundary tokens each,
a rank-64 language delta (what DAMC's linear merge of four rank-16 deltas gives) and four rank-16 modality
deltas, all random (zero deltas would cost the same). An untrained model writes all its new tokens where a
trained one stops after a letter and EOS, so `--max-new-tokens 2` is measured too: answers as short as the
demo's make decoding media a larger share of the time.

Each version runs in its own process with `PYTHONPATH` pointing at its `src` (`--before` is a checkout of the
older code, e.g. `git archive <commit> src | tar -x -C /tmp/before`); runs alternate between the variants,
`--repeats` times, and the table gives the median items/s with the min-max spread. Predictions of every
variant must agree (the same greedy answers), else the script fails.

The newer code is also measured with the text route always folded (`--forced-fold`), since `eval` folds it only
where its cost estimate says that pays (`ModelPredictor.folding_pays`; checked against measurements by
benchmarks/fold_decision.py).

Run: `python benchmarks/eval_throughput.py --before /tmp/before/src --repeats 3`.
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
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODALITIES = ["image", "audio", "video", "point"]


def setup(work: Path) -> tuple[Path, Path]:
    """The world (seed 0, small profile) and the composed checkpoint, built once under `work`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from mmcompose.checkpoint import save_checkpoint
    from mmcompose.model import DeltaSpec, ModelSpec, MultimodalLLM, load_base, modality_spec
    from mmcompose.tensorfiles import fingerprint_base
    from mmcompose.train.base_llm import BASE_PROFILES, read_documents
    from mmcompose.train.tokenizer import train_tokenizer
    from mmcompose.world import build_world

    world, base, checkpoint = work / "world", work / "base", work / "composed"
    if not world.is_dir():
        build_world(0, world, "small")
    if not base.is_dir():
        settings = BASE_PROFILES["small"]
        tokenizer = train_tokenizer(read_documents(world / "corpus" / "train.txt"), settings.vocab_size)
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=settings.hidden_size,
                             intermediate_size=settings.intermediate_size, num_hidden_layers=settings.num_layers,
                             num_attention_heads=settings.num_heads, num_key_value_heads=settings.num_heads,
                             max_position_embeddings=1024, bos_token_id=tokenizer.bos_token_id,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                             tie_word_embeddings=True)
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(base)
        tokenizer.save_pretrained(base)
    if not checkpoint.is_dir():
        specs = [modality_spec(m, num_prefix_tokens=5, num_suffix_tokens=5) for m in MODALITIES]
        deltas = [DeltaSpec(name="language", kind="lora", routes=["text"], rank=64, alpha=64.0)]
        deltas += [DeltaSpec(name=m, kind="lora", routes=[m], rank=16, alpha=32.0) for m in MODALITIES]
        llm, tokenizer = load_base(base)
        torch.manual_seed(1)
        model = MultimodalLLM(llm, tokenizer, ModelSpec(modalities=specs, deltas=deltas, strategy="composed"),
                              base, fingerprint_base(base))
        with torch.no_grad():
            for layer in model.routed.values():
                for parameter in layer.deltas.parameters():
                    parameter.copy_(torch.randn_like(parameter) * 0.02)
        save_checkpoint(model, checkpoint)
    return world, checkpoint


def measure(checkpoint: Path, world: Path, workers: int | None, batch_size: int, max_new_tokens: int,
            threads: int, fold: str) -> dict:
    """One timed evaluation with whatever `mmcompose` is on the path (`workers` None: the older runner;
    `fold` auto, on or off for the newer one)."""
    import inspect

    import torch

    from mmcompose.checkpoint import load_checkpoint
    from mmcompose.eval.benchmark import load_benchmark
    from mmcompose.eval.predict import model_predictor
    from mmcompose.eval.runner import run_benchmark

    torch.set_num_threads(threads)
    samples = load_benchmark(world / "data" / "mcub4_test.json", world)
    model = load_checkpoint(checkpoint).eval()
    options = {} if workers is None else {"num_workers": workers}
    predictor = model_predictor(model, max_new_tokens) if workers is None else \
        model_predictor(model, max_new_tokens, fold={"auto": None, "on": True, "off": False}[fold])
    if options and "num_workers" not in inspect.signature(run_benchmark).parameters:
        raise SystemExit("this version of the runner has no num_workers")
    with tempfile.TemporaryDirectory() as out:
        started = time.perf_counter()
        metrics = run_benchmark(samples, predictor, out, "MCUB-4", "choice",
                                progress=False, batch_size=batch_size, **options)
        seconds = time.perf_counter() - started
        lines = (Path(out) / "predictions.jsonl").read_text().splitlines()
    predictions = [json.loads(line)["prediction"] for line in lines]
    return {"seconds": seconds, "items": metrics["n"], "failed": metrics["n_failed"], "predictions": predictions}


def fold_ab(checkpoint: Path, world: Path, batch_size: int, token_budgets: list[int], repeats: int,
            threads: int) -> list[dict]:
    """The model alone on one batch of MCUB-4 items (prepared beforehand): `generate` with the text route folded
    and unfolded, alternating, `repeats` times; seconds per call."""
    import torch

    from mmcompose.checkpoint import load_checkpoint
    from mmcompose.eval.benchmark import load_benchmark
    from mmcompose.eval.predict import model_predictor

    torch.set_num_threads(threads)
    samples = load_benchmark(world / "data" / "mcub4_test.json", world)[:batch_size]
    model = load_checkpoint(checkpoint).eval()
    examples = [model_predictor(model).prepare(sample) for sample in samples]
    rows = []
    for tokens in token_budgets:
        times: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(repeats):
            for folded in (False, True):
                if folded:
                    model.fold_text_route()
                started = time.perf_counter()
                model.generate(examples, tokens)
                times[folded].append(time.perf_counter() - started)
                model.unfold_text_route()
        rows.append({"tokens": tokens, "pays": model_predictor(model, tokens).folding_pays(examples),
                     "unfolded": times[False], "folded": times[True]})
    return rows


def run_variant(src: Path, work: Path, workers: int | None, batch_size: int, max_new_tokens: int,
                threads: int, fold: str) -> dict:
    command = [sys.executable, __file__, "--measure", "--work", str(work), "--batch-size", str(batch_size),
               "--max-new-tokens", str(max_new_tokens), "--threads", str(threads), "--fold", fold]
    if workers is not None:
        command += ["--workers", str(workers)]
    env = {**os.environ, "PYTHONPATH": str(src)}
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"{src} (workers {workers}) failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", type=Path, help="the older code's src directory")
    parser.add_argument("--after", type=Path, default=ROOT / "src", help="this code's src directory")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2],
                        help="--num-workers values of the newer code to measure")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the evaluating process")
    parser.add_argument("--fold", choices=["auto", "on", "off"], default="auto", help=argparse.SUPPRESS)
    parser.add_argument("--forced-fold", type=int, nargs="*", default=[1],
                        help="--num-workers values also measured with the text route always folded")
    parser.add_argument("--max-new-tokens", type=int, nargs="+", default=[16, 2])
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "mmcompose-eval-throughput")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "RESULTS.md")
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--fold-ab", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.fold_ab:
        print(json.dumps(fold_ab(args.work / "composed", args.work / "world", args.batch_size, args.max_new_tokens,
                                 7, args.threads)))
        return
    if args.measure:
        world, checkpoint = args.work / "world", args.work / "composed"
        workers = args.workers[0] if "--workers" in sys.argv else None
        result = measure(checkpoint, world, workers, args.batch_size, args.max_new_tokens[0], args.threads,
                         args.fold)
        print(json.dumps(result))
        return

    commit = subprocess.run(["git", "-C", str(args.after), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, check=False).stdout.strip() or "unknown"
    sys.path.insert(0, str(args.after))
    setup(args.work)
    variants: list[tuple[str, Path, int | None, str]] = []
    if args.before is not None:
        variants.append(("before", args.before, None, "auto"))
    variants += [(f"after, {n} workers", args.after, n, "auto") for n in args.workers]
    variants += [(f"after, {n} workers, always folded", args.after, n, "on") for n in args.forced_fold]
    load = os.getloadavg()
    rows = []
    for tokens in args.max_new_tokens:
        seconds: dict[str, list[float]] = {name: [] for name, _, _, _ in variants}
        answers: dict[str, list[str]] = {}
        for repeat in range(args.repeats):
            for name, src, workers, fold in variants:
                result = run_variant(src, args.work, workers, args.batch_size, tokens, args.threads, fold)
                if result["failed"]:
                    raise SystemExit(f"{name}: {result['failed']} items failed")
                seconds[name].append(result["seconds"])
                items = result["items"]
                if answers.setdefault(name, result["predictions"]) != result["predictions"]:
                    raise SystemExit(f"{name}: predictions differ between repeats")
                print(f"max_new_tokens {tokens}, repeat {repeat + 1}, {name}: {items / result['seconds']:.1f} items/s",
                      flush=True)
        reference = next(iter(answers.values()))
        agree = {name: sum(a == b for a, b in zip(found, reference, strict=True)) for name, found in answers.items()}
        anchor = statistics.median(items / s for s in seconds[variants[0][0]])
        for name, _, _, _ in variants:
            rates = [items / s for s in seconds[name]]
            median = statistics.median(rates)
            rows.append(f"| {tokens} | {name} | {median:.1f} | {min(rates):.1f}-{max(rates):.1f} | "
                        f"{median / anchor:.2f}x | {agree[name]}/{items} |")
    command = [sys.executable, __file__, "--fold-ab", "--work", str(args.work), "--batch-size", str(args.batch_size),
               "--threads", str(args.threads), "--max-new-tokens", *map(str, args.max_new_tokens)]
    done = subprocess.run(command, env={**os.environ, "PYTHONPATH": str(args.after)}, capture_output=True, text=True,
                          check=True)
    def ms(times: list[float]) -> str:
        return f"{min(times) * 1000:.0f} ({statistics.median(times) * 1000:.0f})"

    fold_rows = [f"| {row['tokens']} | {ms(row['unfolded'])} | {ms(row['folded'])} | "
                 f"{min(row['folded']) / min(row['unfolded']):.2f}x | {'yes' if row['pays'] else 'no'} |"
                 for row in json.loads(done.stdout.strip().splitlines()[-1])]
    end_load = os.getloadavg()
    import torch

    lines = [
        f"## eval_throughput ({date.today().isoformat()})",
        "",
        f"- command: `python benchmarks/eval_throughput.py{' --before ' + str(args.before) if args.before else ''} "
        f"--repeats {args.repeats} --workers {' '.join(map(str, args.workers))} --threads {args.threads}` "
        f"(after: {args.after}, commit {commit})",
        f"- machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {args.threads} torch "
        "thread(s) in the evaluating process (DataLoader workers: 1 each); load average "
        f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1/5/15 min) at the start, {end_load[0]:.1f} at the end",
        "- what: `run_benchmark` as `mmcompose eval` runs it on the small world's MCUB-4 test file (60 items, 4 "
        "media each), batch 16, greedy; an untrained model of the demo's composed shape (see the script); "
        "load not timed",
        f"- items/s: median and min-max over {args.repeats} repeats, variants interleaved; `x first` is the ratio "
        "of medians to the first row of the same token budget; `same answers` counts predictions equal to the "
        "first row's",
        "",
        "| max new tokens | code | items/s | spread | x first | same answers |",
        "|---:|---|---:|---|---:|---:|",
        *rows,
        "",
        f"The model alone, one batch of {args.batch_size} prepared items, `generate` folded vs unfolded, alternating, "
        "7 times: ms as min (median); `folding_pays` is what `eval` decides for this batch.",
        "",
        "| max new tokens | unfolded ms | folded ms | folded / unfolded (min) | folding_pays |",
        "|---:|---:|---:|---:|---|",
        *fold_rows,
    ]
    from report import publish

    publish(lines, args.results)


if __name__ == "__main__":
    main()
