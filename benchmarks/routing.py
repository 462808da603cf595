"""Routing cost: a 4-modality DAMC-composed model vs the bare base LLM under transformers' own `generate`.

A composed model with four modality deltas plus a text delta (rank 16) on a ~60M-parameter LLaMA; every
variant shares the same base weights and the same prompt (its embeddings, modality features included) and
is measured in the same run, interleaved:

* hf-generate - the reference: transformers' `model.generate` (greedy) on the bare base `LlamaForCausalLM`;
* base        - our generation loop on the bare base LLM (no deltas);
* routed      - mmcompose: text delta folded into W, each modality's `D_m` and `-D_text` on its own tokens only;
* serving     - `routed` as `mmcompose serve` runs it: prefill is the batcher's (`generation.prefill`, into a KV
                cache), decode goes through the server's batcher (one request);
* masked      - the official code's approach: every delta computed on every token, then masked by route.

Decode tok/s is 1 / the median interval between successive generated tokens (prefill excluded), from a
timestamp per token (a stopping criterion for `generate`, `on_token` for our loop, the batcher's token
times); prefill is one forward over the prompt. Ratios are to hf-generate; medians with the min-max spread
over repeats. Run: `python benchmarks/routing.py` (one torch thread by default).

Each is measured twice: in wall time, and in the CPU time of the process (`time.process_time()`, taken with
each timestamp above), which a machine loaded by other jobs disturbs much
less (with one torch thread the process runs on one core at a time; waiting for a core is not counted).
Then in pairs, each variant back to back with hf-generate (order alternating), reported as the median of the
per-pair CPU-time ratios with quartiles: a ratio of two runs a fraction of a second apart is what a load that
changes over seconds disturbs least. Prefill: `--pairs` pairs for base, routed and serving; decode:
`--decode-pairs` pairs of whole generations for routed and serving (the ratio of their CPU seconds per token).
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import statistics
import tempfile
import threading
import time
from datetime import date
from pathlib import Path

import torch
from fixtures import randomize_deltas
from report import publish
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, StoppingCriteria, StoppingCriteriaList

from mmcompose.model import Example, MultimodalLLM, RoutedLinear, modality_spec
from mmcompose.model.generation import prefill as serving_prefill
from mmcompose.serve.batcher import Batcher, Job
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


def four_input_example() -> Example:
    """The measured prompt: one random input per modality and an MCUB-4-style question (seeded, so every variant
    and script sees the same one)."""
    generator = torch.Generator().manual_seed(2)
    return Example(
        prompt="USER: " + "\n".join(f"<{m}>" for m in MODALITIES) + "\nWhat do these four have in common? "
        "A. desert B. forest C. sea D. cave. Answer with the letter. ASSISTANT:",
        inputs={m: [torch.randn(INPUTS[m], generator=generator)] for m in MODALITIES},
    )


def build(base: Path, strategy: str, rank: int) -> MultimodalLLM:
    specs = [modality_spec(m, num_prefix_tokens=5, num_suffix_tokens=5) for m in MODALITIES]
    model = MultimodalLLM.from_base(base, specs, strategy=strategy, rank=rank, alpha=2.0 * rank)
    randomize_deltas(model)
    return model.eval()


def time_once(function) -> tuple[float, float]:
    """Wall and CPU seconds of one call."""
    start, cpu = time.perf_counter(), time.process_time()
    function()
    return time.perf_counter() - start, time.process_time() - cpu


class TokenClock(StoppingCriteria):
    """Never stops; records when each token was generated (called once per step by `generate`)."""

    def __init__(self, times: list[tuple[float, float]]) -> None:
        self.times = times

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        self.times.append(clock())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


def clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


class TokenStamps(list):
    """The batcher's `token_times`: it appends `perf_counter()` at each token (in its own thread); we keep that
    with the process's CPU time at the same moment."""

    def append(self, wall: float) -> None:
        super().append((wall, time.process_time()))


def decode_seconds(times: list[tuple[float, float]], expected: int) -> tuple[float, float]:
    """Wall and CPU seconds per decoded token: the median interval between successive tokens, so that a burst
    of load from other jobs on the machine during a few steps does not move the result."""
    if len(times) != expected:
        raise RuntimeError(f"generation stopped after {len(times)} of {expected} tokens; the rate would be wrong")
    return tuple(statistics.median(later[i] - earlier[i] for earlier, later in itertools.pairwise(times))
                 for i in (0, 1))


def cpu_seconds(functions: tuple, phase: str):
    """A call measuring one variant in CPU time: seconds of its prefill, or seconds per token of its decode."""
    prefill, decode = functions
    return (lambda: time_once(prefill)[1]) if phase == "prefill" else (lambda: decode()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (CPU time is read as one core's)")
    parser.add_argument("--pairs", type=int, default=30, help="prefill pairs timed back to back (see the docstring)")
    parser.add_argument("--decode-pairs", type=int, default=10,
                        help="decode pairs (whole generations) timed back to back (see the docstring)")
    parser.add_argument("--results", type=Path, default=Path(__file__).with_name("RESULTS.md"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as scratch:
        base_path = make_base(Path(scratch) / "base")
        base = build(base_path, "connector-only", args.rank)
        composed = build(base_path, "decoupled", args.rank)
        parameters = sum(p.numel() for p in base.llm.parameters())
        example = four_input_example()
        with torch.no_grad():
            batch = composed.assemble([example], padding_side="left")
        base.branches.load_state_dict(composed.branches.state_dict())

        def prefill(model: MultimodalLLM):
            return lambda: model(batch, logits_to_keep=1)

        def decode(model: MultimodalLLM):
            def run() -> tuple[float, float]:
                times: list[tuple[float, float]] = []
                model.generate([example], max_new_tokens=args.new_tokens,
                               on_token=lambda row, token: times.append(clock()))
                return decode_seconds(times, args.new_tokens)
            return run

        reference = LlamaForCausalLM.from_pretrained(base_path).eval()
        embeds = batch.embeds.detach()

        def hf_prefill() -> None:
            reference(inputs_embeds=embeds, attention_mask=batch.attention_mask, logits_to_keep=1)

        def hf_decode() -> tuple[float, float]:
            times: list[tuple[float, float]] = []
            reference.generate(inputs_embeds=embeds, attention_mask=batch.attention_mask, do_sample=False,
                               max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, pad_token_id=0,
                               stopping_criteria=StoppingCriteriaList([TokenClock(times)]))
            return decode_seconds(times, args.new_tokens)

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
            def run():
                for layer in layers:
                    layer.route_masks = masks
                return function()
            return run

        batcher = Batcher(composed, max_batch=1)
        batcher.start()

        def serving_decode() -> tuple[float, float]:
            done = threading.Event()
            job = Job(example=example, max_tokens=args.new_tokens, token_times=TokenStamps(),
                      notify=lambda event: done.set() if event.kind != "delta" else None)
            batcher.submit(job)
            if not done.wait(600):
                raise RuntimeError("the batcher did not finish")
            return decode_seconds(job.token_times, args.new_tokens)

        variants = {
            "hf-generate": (hf_prefill, hf_decode),
            "base": (prefill(base), decode(base)),
            "routed": (prefill(composed), decode(composed)),
            "serving": (lambda: serving_prefill(composed, batch), serving_decode),
            "masked": (with_masks(prompt_masks, prefill(masked)), with_masks(text_masks, decode(masked))),
        }
        samples = {name: {"prefill": [], "decode": []} for name in variants}
        load_start = os.getloadavg()
        with torch.no_grad():
            for first, second in variants.values():  # warm-up
                first()
                second()
            for _ in range(args.repeats):  # interleaved, so load changes hit every variant alike
                for name, (first, second) in variants.items():
                    samples[name]["prefill"].append(time_once(first))
                    samples[name]["decode"].append(second())
            paired = {"prefill": {name: [] for name in ("base", "routed", "serving")},
                      "decode": {name: [] for name in ("routed", "serving")}}
            for phase, count in (("prefill", args.pairs), ("decode", args.decode_pairs)):
                for index in range(count):  # back to back with the anchor, in alternating order
                    for name, ratios in paired[phase].items():
                        run_anchor, run_own = (cpu_seconds(variants[key], phase) for key in ("hf-generate", name))
                        if index % 2:
                            anchor, own = run_anchor(), run_own()
                        else:
                            own, anchor = run_own(), run_anchor()
                        ratios.append(own / anchor if phase == "prefill" else anchor / own)
        batcher.close()

    tokens = int(batch.attention_mask.sum())
    lines = [
        f"## routing ({date.today().isoformat()})",
        "",
        f"- command: `python benchmarks/routing.py --rank {args.rank} --new-tokens {args.new_tokens} "
        f"--repeats {args.repeats} --threads {args.threads} --pairs {args.pairs} --decode-pairs {args.decode_pairs}`",
        f"- machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {args.threads} "
        f"thread(s); load average (1/5/15 min) {'/'.join(f'{v:.1f}' for v in load_start)} at the start, "
        f"{'/'.join(f'{v:.1f}' for v in os.getloadavg())} at the end; variants interleaved, medians",
        f"- model: LLaMA {parameters / 1e6:.1f}M parameters, 4 modalities, decoupled rank {args.rank} "
        f"(4 modality deltas + text delta), prompt {tokens} tokens ({int((batch.routes > 0).sum())} modality)",
        "",
        "| variant | prefill ms (min-max) | vs hf | prefill CPU ms (min-max) | vs hf | decode tok/s (min-max) "
        "| vs hf-generate | decode tok/s of CPU (min-max) | vs hf-generate |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    reference = samples["hf-generate"]

    def cell(values: list[float], anchor: list[float], rate: bool) -> str:
        """Median (min-max) and the ratio of medians to the anchor's, as ms or as tokens per second."""
        shown = [1 / v if rate else 1000 * v for v in values]
        ratio = statistics.median(anchor) / statistics.median(values)
        return (f"{statistics.median(shown):.1f} ({min(shown):.1f}-{max(shown):.1f}) | "
                f"{ratio if rate else 1 / ratio:.3f}x")

    for name, timing in samples.items():
        columns = [cell([t[i] for t in timing[phase]], [t[i] for t in reference[phase]], phase == "decode")
                   for phase in ("prefill", "decode") for i in (0, 1)]
        lines.append(f"| {name} | " + " | ".join(columns) + " |")
    lines += ["", "Ratios are of medians, all variants measured interleaved in this run; the machine is shared "
              "with other jobs, so absolute numbers move between runs and only the ratios compare.", ""]
    measures = {"prefill": "prefill CPU time of {} / hf-generate's",
                "decode": "decode tok/s of CPU of {} / hf-generate's"}
    for phase, by_variant in paired.items():
        for name, ratios in by_variant.items():
            if len(ratios) < 2:
                continue
            quartiles = statistics.quantiles(ratios, n=4)
            lines.append(f"- {measures[phase].format(name)}, {len(ratios)} pairs timed back to back: median "
                         f"{statistics.median(ratios):.3f}x (quartiles {quartiles[0]:.3f}-{quartiles[2]:.3f}, "
                         f"min-max {min(ratios):.3f}-{max(ratios):.3f})")
    publish(lines, args.results)


if __name__ == "__main__":
    main()
