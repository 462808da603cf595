"""Is `eval`'s decision to fold the text route right? `generate` folded vs unfolded against `folding_pays`.

Cases (`--scale`):

* demo   - the model of benchmarks/eval_throughput.py (the demo's composed shape: hidden 128, 3 layers, a rank-64
           language delta and four rank-16 modality deltas, float32) on the small world's MCUB-4 items, batches of
           1, 8 and 16, 1, 8 and 32 new tokens;
* vicuna - vicuna-7b-v1.5's widths (hidden 4096, intermediate 11008, vocabulary 32000) with one decoder layer in
           bfloat16, random weights, a rank-512 language delta and four rank-128 modality deltas (the released
           DAMC system's), on one MCUB-4-shaped item (four inputs of 576, 36, 2025 and 529 positions plus 5 + 5
           boundary tokens each, ~100 text positions) at 1, 16, 128 and 512 new tokens, and one text-heavy chat
           item (one image, ~300 text positions) at 16 and 512. The encoders are small patch encoders with a
           linear connector: they cost the same folded or not, only their number of positions matters here.

Each case's forms alternate (the first form alternating too), `--repeats` times; one `generate` per form and
repeat runs to the largest token budget, and the time to a smaller budget is the time at which its last token was
chosen (what a `generate` of that budget costs but the untimed final decoding of the text). Times are the thread's
CPU time (`time.thread_time()`, one torch thread): what a loaded machine disturbs least. The measured winner is
the faster form when the ratio unfolded / folded of every pair (the two forms back to back) lies on one side of 1,
else a tie; `rule` is `ModelPredictor.folding_pays` on the same examples, and a case with a winner must agree.

`--calibrate` measures the constants of `mmcompose.eval.fold_cost` on this machine instead.

    taskset -c 1 python benchmarks/fold_decision.py --scale demo vicuna
    taskset -c 1 python benchmarks/fold_decision.py --calibrate
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import torch
import torch.nn.functional as F
from eval_throughput import setup
from fixtures import randomize_deltas
from report import publish
from transformers import LlamaConfig, LlamaForCausalLM

from mmcompose.eval.fold_cost import cpu_kind
from mmcompose.model import Component, DeltaSpec, Example, ModelSpec, MultimodalLLM, load_base, modality_spec
from mmcompose.tensorfiles import fingerprint_base
from mmcompose.train.tokenizer import train_tokenizer

ROOT = Path(__file__).resolve().parents[1]
MODALITIES = ["image", "audio", "video", "point"]
SIDES = {"image": 24, "audio": 6, "video": 45, "point": 23}
"""Side of the square patch grid standing for each modality at vicuna scale: 576 positions for CLIP-L/336, 36 for
BEATs + Q-Former, 2025 for an 8-frame LanguageBind video, 529 for Point-BERT."""


@dataclass
class Case:
    scale: str
    name: str
    model: MultimodalLLM
    examples: list[Example]
    budgets: list[int]


def vicuna_model(work: Path) -> MultimodalLLM:
    """One decoder layer at vicuna-7b's widths in bfloat16, random; its base saved under `work` (folding reads
    the base's files back to unfold)."""
    base = work / "vicuna-1layer"
    if not base.is_dir():
        tokenizer = train_tokenizer([f"word{i} and thing{i * 7} ." for i in range(4000)], vocab_size=4096)
        config = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=1,
                             num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                             bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                             tie_word_embeddings=False)
        torch.manual_seed(0)
        LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(base)
        tokenizer.save_pretrained(base)
    specs = [modality_spec(m, encoder=Component(type="image-patch", options=dict(
        image_size=SIDES[m], patch_size=1, width=16, depth=1, heads=2)), connector=Component(type="linear"),
        num_prefix_tokens=5, num_suffix_tokens=5) for m in MODALITIES]
    deltas = [DeltaSpec(name="language", kind="lora", routes=["text"], rank=512, alpha=512.0)]
    deltas += [DeltaSpec(name=m, kind="lora", routes=[m], rank=128, alpha=256.0) for m in MODALITIES]
    llm, tokenizer = load_base(base, torch.bfloat16)
    torch.manual_seed(1)
    model = MultimodalLLM(llm, tokenizer, ModelSpec(modalities=specs, deltas=deltas, strategy="composed"), base,
                          fingerprint_base(base))
    randomize_deltas(model)
    return model.eval()


def vicuna_cases(work: Path) -> list[Case]:
    model = vicuna_model(work)
    generator = torch.Generator().manual_seed(2)
    question = "What scene do they share? A. desert B. forest C. harbour D. cave. Answer with the letter."
    mcub = Example(prompt="USER: " + "\n".join(f"<{m}>" for m in MODALITIES) + f"\n{question} ASSISTANT:",
                   inputs={m: [torch.randn(3, SIDES[m], SIDES[m], generator=generator)] for m in MODALITIES})
    chat = Example(prompt="USER: <image>\n" + " ".join(
        f"Tell me more about the thing number {i} in this picture and how it relates to the rest." for i in range(4))
        + " ASSISTANT:", inputs={"image": [torch.randn(3, SIDES["image"], SIDES["image"], generator=generator)]})
    return [Case("vicuna", "MCUB-4 item", model, [mcub], [1, 16, 128, 512]),
            Case("vicuna", "chat item (1 image)", model, [chat], [16, 512])]


def demo_cases(work: Path) -> list[Case]:
    from mmcompose.checkpoint import load_checkpoint
    from mmcompose.eval.benchmark import load_benchmark
    from mmcompose.eval.predict import model_predictor

    world, checkpoint = setup(work)
    model = load_checkpoint(checkpoint).eval()
    samples = load_benchmark(world / "data" / "mcub4_test.json", world)
    prepare = model_predictor(model).prepare
    return [Case("demo", f"MCUB-4 x {batch}", model, [prepare(sample) for sample in samples[:batch]], [1, 8, 32])
            for batch in (1, 8, 16)]


def timed_generate(model: MultimodalLLM, examples: list[Example], budgets: list[int]) -> list[float]:
    """Thread CPU seconds from the call to the step that chose each budget's tokens, in one `generate`."""
    stamps: list[float] = []
    counts = [0] * len(examples)

    def on_token(row: int, _token: int) -> None:
        counts[row] += 1
        if counts[row] > len(stamps):
            stamps.append(time.thread_time())

    started = time.thread_time()
    model.generate(examples, max(budgets), on_token=on_token)
    if len(stamps) < max(budgets):
        raise SystemExit(f"generation stopped after {len(stamps)} of {max(budgets)} tokens (EOS): choose other inputs")
    return [stamps[budget - 1] - started for budget in budgets]


def measure(case: Case, repeats: int) -> list[dict]:
    from mmcompose.eval.predict import ModelPredictor

    times: dict[bool, list[list[float]]] = {False: [], True: []}
    for repeat in range(repeats):
        for folded in (False, True) if repeat % 2 == 0 else (True, False):
            if folded:
                case.model.fold_text_route()
            times[folded].append(timed_generate(case.model, case.examples, case.budgets))
            case.model.unfold_text_route()
    rows = []
    for index, budget in enumerate(case.budgets):
        unfolded, folded = ([run[index] for run in times[form]] for form in (False, True))
        ratios = [u / f for u, f in zip(unfolded, folded, strict=True)]
        winner = "folded" if min(ratios) > 1 else "unfolded" if max(ratios) < 1 else "tie"
        rule = "folded" if ModelPredictor(case.model, budget).folding_pays(case.examples) else "unfolded"
        rows.append(dict(scale=case.scale, case=case.name, tokens=budget, unfolded=unfolded, folded=folded,
                         ratios=ratios, winner=winner, rule=rule))
        print(f"{case.scale} {case.name}, {budget} new tokens: unfolded/folded {statistics.median(ratios):.3f} "
              f"({min(ratios):.3f}-{max(ratios):.3f}), measured {winner}, rule {rule}", flush=True)
    return rows


def seconds_per_call(function: Callable[[], object], calls: int, repeats: int = 5) -> float:
    """Median thread CPU seconds of one call over `repeats` runs of `calls` calls."""
    function()
    runs = []
    for _ in range(repeats):
        started = time.thread_time()
        for _ in range(calls):
            function()
        runs.append((time.thread_time() - started) / calls)
    return statistics.median(runs)


def calibrate() -> list[str]:
    """The constants of `mmcompose.eval.fold_cost.COSTS` and `ROUTED_LINEAR_OPS`, measured here."""
    from mmcompose.model.routed import RouteContext, RoutedLinear, RoutePlan

    lines = ["| dtype | widths, rank | GMAC/s, 1024 rows | GMAC/s, 1 row | floor rows | op us | gather ns/el | "
             "scatter ns/el |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    tiny = torch.randn(1, 8)
    op = seconds_per_call(lambda: F.linear(tiny, tiny), 2000)
    for dtype, inputs, outputs, rank in [(torch.float32, 128, 344, 64), (torch.float32, 4096, 4096, 512),
                                         (torch.bfloat16, 4096, 11008, 128), (torch.bfloat16, 4096, 4096, 512)]:
        a, b = torch.randn(rank, inputs, dtype=dtype), torch.randn(outputs, rank, dtype=dtype)
        rates = []
        for rows in (1024, 1):
            x, y = torch.randn(rows, inputs, dtype=dtype), torch.randn(rows, outputs, dtype=dtype)
            seconds = seconds_per_call(lambda x=x, y=y, a=a, b=b: y.addmm_(F.linear(x, a), b.t()),
                                       3 if inputs > 1000 else 50)
            rates.append(rows * rank * (inputs + outputs) / seconds)
        source = torch.randn(4096, outputs, dtype=dtype)
        rows = torch.randperm(4096)[:2048].sort().values
        update = torch.randn(2048, outputs, dtype=dtype)
        gather = seconds_per_call(lambda s=source, r=rows: s.index_select(0, r), 20) / update.numel()
        scatter = seconds_per_call(lambda s=source, r=rows, u=update: s.index_put_((r,), u, accumulate=True),
                                   20) / update.numel()
        lines.append(f"| {str(dtype).removeprefix('torch.')} | {inputs} -> {outputs}, {rank} | {rates[0] / 1e9:.1f} | "
                     f"{rates[1] / 1e9:.1f} | {rates[0] / rates[1]:.1f} | {op * 1e6:.1f} | {gather * 1e9:.2f} | "
                     f"{scatter * 1e9:.2f} |")
    context = RouteContext({0: "text"})
    layer = RoutedLinear(torch.nn.Linear(8, 8, bias=False), context)
    layer.add_delta("text", "lora", 1, 1.0)
    x = torch.randn(1, 1, 8)
    with torch.no_grad():
        bare = seconds_per_call(lambda: layer(x), 2000)
        context.plan = RoutePlan.everywhere((("text", 1),))
        routed = seconds_per_call(lambda: layer(x), 2000)
        context.plan = None
    lines += ["", "A routed linear (8 -> 8, rank 1, one row) with the text delta's plan costs "
              f"{(routed - bare) * 1e6:.1f} us more than without a plan: {(routed - bare) / op:.1f} ops of "
              f"{op * 1e6:.1f} us, two of them the delta's."]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", nargs="+", choices=["demo", "vicuna"], default=["demo", "vicuna"])
    parser.add_argument("--repeats", type=int, nargs=2, default=[7, 3], metavar=("DEMO", "VICUNA"))
    parser.add_argument("--calibrate", action="store_true", help="measure the cost model's constants instead")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "mmcompose-fold-decision")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "RESULTS.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    load = os.getloadavg()
    started = datetime.now().strftime("%Y-%m-%d %H:%M")
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, check=False).stdout.strip() or "unknown"
    affinity = sorted(os.sched_getaffinity(0))
    machine = (f"{platform.machine()}, {os.cpu_count()} cores (this process on {affinity}), torch {torch.__version__}, "
               f"1 torch thread, `{cpu_kind()}` constants (`mmcompose.eval.fold_cost.cpu_kind`)")
    if args.calibrate:
        body = calibrate()
        end = os.getloadavg()
        publish([f"## fold_decision calibration ({started})", "",
                 f"- command: `taskset -c {','.join(map(str, affinity))} python benchmarks/fold_decision.py "
                 f"--calibrate` (commit {commit})",
                 f"- machine: {machine}; load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} at the start, "
                 f"{end[0]:.1f} at the end", "", *body], args.results)
        return
    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    for scale in args.scale:
        cases = demo_cases(args.work) if scale == "demo" else vicuna_cases(args.work)
        for case in cases:
            rows += measure(case, args.repeats[0] if scale == "demo" else args.repeats[1])
        del cases
    end = os.getloadavg()

    def seconds(values: list[float]) -> str:
        return f"{statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f})"

    table = [f"| {r['scale']} | {r['case']} | {r['tokens']} | {seconds(r['unfolded'])} | {seconds(r['folded'])} | "
             f"{statistics.median(r['ratios']):.3f} ({min(r['ratios']):.3f}-{max(r['ratios']):.3f}) | {r['winner']} | "
             f"{r['rule']} | {'yes' if r['winner'] in ('tie', r['rule']) else 'NO'} |" for r in rows]
    publish([f"## fold_decision ({started})", "",
             f"- command: `taskset -c {','.join(map(str, affinity))} python benchmarks/fold_decision.py --scale "
             f"{' '.join(args.scale)} --repeats {args.repeats[0]} {args.repeats[1]}` (commit {commit})",
             f"- machine: {machine}; load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1/5/15 min) at the "
             f"start, {end[0]:.1f} at the end",
             "- thread CPU seconds of `generate` to the budget's last token, median (min-max) over the repeats; "
             "`u/f`: unfolded / folded per pair of back-to-back runs, median (min-max); measured: the faster form when "
             "every pair agrees, else tie; rule: `ModelPredictor.folding_pays`",
             "",
             "| scale | case | new tokens | unfolded s | folded s | u/f | measured | rule | agrees |",
             "|---|---|---:|---:|---:|---:|---|---|---|",
             *table], args.results)
    if any(r["winner"] not in ("tie", r["rule"]) for r in rows):
        sys.exit("the rule disagrees with a measured winner")


if __name__ == "__main__":
    main()
