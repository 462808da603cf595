"""Real-scale memory: the composed four-modality system at vicuna-7b-v1.5's widths, random weights, on a CPU.

`write` builds, deterministically from a seed and without downloading anything:

* `base/`: a random LLaMA with vicuna-7b-v1.5's widths (hidden 4096, intermediate 11008, 32 heads, vocabulary
  32000; `--layers 16` or 32) saved in bf16 as transformers' sharded layout (`model-0000i-of-0000n.safetensors`
  + `model.safetensors.index.json`), with a locally trained byte-level BPE tokenizer padded to 32000 tokens;
* `composed/`: an mmcompose checkpoint of the DAMC-composed released system on it: CLIP ViT-L/14-336 (image),
  BEATs + a 32-query Q-Former (audio), LanguageBind video (8 x 257 tokens), Point-BERT v1.2 (513 tokens), the
  connectors of the release, four modality LoRAs of rank 128 and the merged language delta (one LoRA of rank
  512) on the 7 target linears, every tensor in bf16;
* `mcub/`: two MCUB-4-shaped items in the official layout (`MCUB-4.json` + `MCUB-answer.json`) with a PNG, a
  WAV, an MP4 and an NPY each.

A float32 7B model does not fit a 24 GiB machine, so nothing is ever materialised whole: the model is built on
the meta device only to learn every tensor's name and shape, and each tensor is then drawn (float32, from its
own seeded generator), cast to bf16 and streamed to its place in a safetensors file, one at a time.

`measure` runs one measurement in this process and prints one JSON line; `run` starts each measurement in a
fresh subprocess (so each sees only its own allocations) and prints a table:

* `load`  - `MultimodalLLM.from_pretrained(composed, dtype=bf16)`, then one read of every page of every tensor
            (weights memory-mapped from the safetensors files are only resident once read);
* `fold`  - `load` + `fold_text_route()` + one greedy `generate` on a text prompt (the issue's measure);
* `serve` - `mmcompose serve` in this process (every weight read once before the app folds it), answering one
            HTTP request (a text prompt) on loopback;
* `eval`  - `mmcompose eval --benchmark mcub` on the two items.

Weights stored in the dtype they are loaded in are memory-mapped, so part of what a process holds is file-backed
(the `file` column; folding turns the pages it writes into anonymous ones) and the kernel may evict it under
memory pressure: a run beside another large process can show less than the model. Compare runs made alone.

Peak RSS is the kernel's high-water mark (`VmHWM`) minus the RSS after every import (the interpreter's own
baseline); a sampler thread also records the anonymous and file-backed parts at the peak. The ratio is to the
bytes of the model's tensors (base + checkpoint, in bf16), read from the safetensors headers.

    python benchmarks/realscale.py write /data/rs16 --layers 16
    python benchmarks/realscale.py run /data/rs16 --only load,serve,eval
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import resource
import subprocess
import sys
import threading
import time
import urllib.request
import zlib
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from mmcompose.files import atomic_directory
from mmcompose.model import Component, DeltaSpec, ModelSpec, MultimodalLLM, modality_spec
from mmcompose.model.manifest import TENSOR_FILE, BaseReference, Manifest, base_reference, write_manifest
from mmcompose.tensorfiles import SafetensorsStream, fingerprint_base, safetensors_header, weight_files
from mmcompose.train.tokenizer import train_tokenizer
from mmcompose.world.render import write_audio, write_image, write_point, write_video

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
LAMBDAS = {"image": 0.4, "audio": 0.3, "video": 0.2, "point": 0.1}  # the official DAMC coefficients


@dataclass(frozen=True)
class Shapes:
    """Every width of the system; `FULL` is the release's, `TINY` a CPU-seconds version of the same layout."""

    llm: dict[str, Any]
    clip: dict[str, Any]
    languagebind: dict[str, Any]
    beats: dict[str, Any]
    qformer: dict[str, Any]
    point_bert: dict[str, Any]
    image_size: int
    video_size: int
    modality_rank: int
    language_rank: int
    media: dict[str, Any] = field(default_factory=dict)


FULL = Shapes(
    llm=dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
             vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5),
    clip=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
              image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu"),
    languagebind=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                      image_size=224, patch_size=14, num_frames=8, add_time_attn=True),
    beats={},  # BEATs_iter3_plus_AS2M: the encoder's defaults
    qformer=dict(num_queries=32, num_layers=2, width=768, num_heads=12, intermediate_size=3072, num_positions=1024),
    point_bert=dict(trans_dim=384, depth=12, num_heads=6, group_size=32, num_group=512, encoder_dims=256,
                    point_dims=6, drop_cls=False),
    image_size=336, video_size=224, modality_rank=128, language_rank=512,
    media=dict(image=(336, 336), audio_seconds=10.0, video=(16, 224, 224), points=8192),
)
TINY = Shapes(
    llm=dict(hidden_size=64, intermediate_size=192, num_attention_heads=4, num_key_value_heads=4,
             vocab_size=1024, max_position_embeddings=2048, rms_norm_eps=1e-5),
    clip=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=28,
              patch_size=14, projection_dim=16, hidden_act="quick_gelu"),
    languagebind=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      image_size=28, patch_size=14, num_frames=8, add_time_attn=True),
    beats=dict(encoder_layers=2, encoder_embed_dim=32, encoder_ffn_embed_dim=64, encoder_attention_heads=2,
               embed_dim=16, conv_pos=16, conv_pos_groups=4),
    qformer=dict(num_queries=4, num_layers=1, width=24, num_heads=2, intermediate_size=32, num_positions=1024),
    point_bert=dict(trans_dim=32, depth=2, num_heads=2, group_size=8, num_group=16, encoder_dims=24,
                    point_dims=6, drop_cls=False),
    image_size=28, video_size=28, modality_rank=8, language_rank=32,
    media=dict(image=(40, 40), audio_seconds=1.0, video=(8, 32, 32), points=256),
)


def system_spec(shapes: Shapes) -> ModelSpec:
    """The manifest's model: the four released modalities composed by DAMC (`linear` merge of the language
    adapters, so the language delta's rank is the sum of theirs)."""
    image = modality_spec(
        "image", encoder=Component(type="clip-vision", options=dict(config=shapes.clip, feature_layer=-2)),
        processor=Component(type="image", options=dict(size=shapes.image_size, mean=list(CLIP_MEAN),
                                                       std=list(CLIP_STD))),
        connector=Component(type="mlp2x_gelu"))
    audio = modality_spec(
        "audio", encoder=Component(type="beats", options=dict(cfg=shapes.beats)),
        processor=Component(type="beats-fbank"), connector=Component(type="qformer", options=shapes.qformer))
    video = modality_spec(
        "video", encoder=Component(type="languagebind-video", options=dict(config=shapes.languagebind,
                                                                         feature_layer=-2)),
        processor=Component(type="languagebind-video", options=dict(num_frames=shapes.languagebind["num_frames"],
                                                                    size=shapes.video_size)),
        connector=Component(type="mlp2x_gelu"))
    point = modality_spec(
        "point", encoder=Component(type="point-bert", options=shapes.point_bert),
        processor=Component(type="point", options=dict(num_points=shapes.media["points"], with_color=True)),
        connector=Component(type="mlp2x_gelu"))
    rank = shapes.modality_rank
    deltas = [DeltaSpec(name="language", kind="lora", routes=["text"], rank=shapes.language_rank,
                        alpha=float(shapes.language_rank),
                        source={"merge": "linear", "inputs": list(LAMBDAS), "ranks": [rank] * 4})]
    deltas += [DeltaSpec(name=name, kind="lora", routes=[name], rank=rank, alpha=2.0 * rank,
                         source={"model": name, "delta": name}) for name in LAMBDAS]
    return ModelSpec(modalities=[image, audio, video, point], deltas=deltas, template="vicuna_v1",
                     strategy="composed")


# --- writing ------------------------------------------------------------------------------------------------
def random_tensor(name: str, shape: tuple[int, ...], dtype: torch.dtype, norm: bool, seed: int,
                  device: str = "cpu") -> torch.Tensor:
    """A plausible value for a tensor of a trained network: norms' weights 1, biases and running means 0,
    running variances 1, everything else N(0, 0.02), drawn in float32 on `device` from the tensor's own
    generator (so any tensor can be rebuilt alone; a GPU's generator draws other values than the CPU's) and
    cast."""
    leaf = name.rpartition(".")[2]
    if not dtype.is_floating_point:
        return torch.zeros(shape, dtype=dtype)
    if leaf == "running_var" or (norm and leaf == "weight"):
        return torch.ones(shape, dtype=dtype)
    if leaf in ("bias", "running_mean"):
        return torch.zeros(shape, dtype=dtype)
    generator = torch.Generator(device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    return torch.randn(shape, generator=generator, device=device).mul_(0.02).to(dtype)


def _norm_parameters(module: torch.nn.Module, prefix: str = "") -> set[str]:
    """Names of the parameters that belong to normalisation layers (LayerNorm, RMSNorm, BatchNorm, ...)."""
    return {f"{prefix}{path}.{name}".lstrip(".")
            for path, child in module.named_modules() if "Norm" in type(child).__name__
            for name, _ in child.named_parameters(recurse=False)}


def _stream(path: Path, layout: dict[str, tuple[torch.dtype, tuple[int, ...]]], norms: set[str],
            seed: int, device: str) -> None:
    with SafetensorsStream(path, layout) as stream:
        for name, (dtype, shape) in layout.items():
            stream.write(name, random_tensor(name, shape, dtype, name in norms, seed, device))


def _tokenizer(vocab_size: int, seed: int) -> Any:
    """A byte-level BPE trained on made-up words, padded with unused tokens to exactly `vocab_size`."""
    rng = np.random.default_rng(seed)
    syllables = [a + b for a in "bdfgklmnprstvz" for b in "aeiou"]
    words = [" ".join("".join(rng.choice(syllables, size=rng.integers(1, 5))) for _ in range(40))
             for _ in range(3000)]
    tokenizer = train_tokenizer([*words, "USER: ASSISTANT: A B C D ( ) ? . \n"], vocab_size=min(vocab_size, 8000))
    tokenizer.add_tokens([f"<unused{i}>" for i in range(vocab_size - len(tokenizer))])
    return tokenizer


def write_base(directory: Path, shapes: Shapes, layers: int, seed: int, shard_bytes: int, device: str) -> int:
    """The random LLaMA as transformers' sharded safetensors layout; returns the bytes of its tensors."""
    tokenizer = _tokenizer(shapes.llm["vocab_size"], seed)
    config = LlamaConfig(**shapes.llm, num_hidden_layers=layers, tie_word_embeddings=False, dtype="bfloat16",
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    with torch.device("meta"):
        llm = LlamaForCausalLM(config)
    norms = _norm_parameters(llm)
    layout = {name: (torch.bfloat16, tuple(tensor.shape)) for name, tensor in llm.state_dict().items()}
    shards: list[dict[str, tuple[torch.dtype, tuple[int, ...]]]] = [{}]
    size = 0
    for name, (dtype, shape) in layout.items():
        nbytes = 2 * math.prod(shape)
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = (dtype, shape)
        size += nbytes
    weight_map = {}
    for index, shard in enumerate(shards, 1):
        file = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        print(f"  base shard {index}/{len(shards)}: {len(shard)} tensors", flush=True)
        _stream(directory / file, shard, norms, seed, device)
        weight_map.update({name: file for name in shard})
    total = sum(2 * math.prod(shape) for _, shape in layout.values())
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    config.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return total


def write_checkpoint_streamed(directory: Path, base: Path, shapes: Shapes, seed: int, device: str) -> int:
    """The composed checkpoint, its layout taken from the model built on the meta device (so the manifest and
    the tensors agree exactly with what `MultimodalLLM` expects), each tensor streamed in bf16."""
    from transformers import AutoTokenizer

    spec = system_spec(shapes)
    fingerprint = fingerprint_base(base)
    config = LlamaConfig.from_pretrained(base)
    with torch.device("meta"):
        model = MultimodalLLM(LlamaForCausalLM(config), AutoTokenizer.from_pretrained(base), spec, base, fingerprint)
        tensors = model.checkpoint_tensors()
    norms = _norm_parameters(model.branches, "modalities.")
    layout = {name: (torch.bfloat16 if t.is_floating_point() else t.dtype, tuple(t.shape))
              for name, t in tensors.items()}
    print(f"  checkpoint: {len(layout)} tensors", flush=True)
    _stream(directory / TENSOR_FILE, layout, norms, seed + 1, device)
    manifest = Manifest(base=BaseReference(path=base_reference(base, directory), fingerprint=fingerprint),
                        model=spec, files=[TENSOR_FILE],
                        provenance={"benchmark": "benchmarks/realscale.py", "seed": seed,
                                    "note": "random weights with the released system's shapes"})
    write_manifest(directory, manifest)
    return sum(dtype.itemsize * math.prod(shape) for dtype, shape in layout.values())


def write_mcub(directory: Path, shapes: Shapes, seed: int, items: int = 2) -> None:
    """`items` MCUB-4-shaped questions in the official layout, each with an image, audio, video and point cloud."""
    media = directory / "media"
    media.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    questions, answers = [], []
    height, width = shapes.media["image"]
    frames, video_h, video_w = shapes.media["video"]
    for index in range(items):
        ramp = np.linspace(0, 255, width, dtype=np.float64)[None, :, None]
        image = np.clip(ramp + rng.normal(0, 30, (height, width, 3)), 0, 255).astype(np.uint8)
        write_image(media / f"{index}.png", image)
        samples = int(16000 * shapes.media["audio_seconds"])
        tone = 0.3 * np.sin(np.arange(samples) * (0.05 + 0.01 * index)) + 0.05 * rng.standard_normal(samples)
        write_audio(media / f"{index}.wav", tone.astype(np.float32))
        video = rng.integers(0, 255, (frames, video_h, video_w, 3), dtype=np.uint8)
        write_video(media / f"{index}.mp4", video)
        points = np.concatenate([rng.standard_normal((shapes.media["points"], 3)),
                                 rng.uniform(0, 1, (shapes.media["points"], 3))], axis=1)
        write_point(media / f"{index}.npy", points.astype(np.float32))
        question = ("<image>\n<audio>\n<video>\n<point>\nWhich animal do these four inputs have in common?\n"
                    "(A) a cat\n(B) a dog\n(C) a bird\n(D) a fish")
        inputs = {m: [f"media/{index}.{ext}"] for m, ext in
                  (("image", "png"), ("audio", "wav"), ("video", "mp4"), ("point", "npy"))}
        questions.append({"id": f"mcub4-{index}", "modal_inputs": inputs,
                          "conversations": [{"from": "human", "value": question}]})
        answers.append({"id": f"mcub4-{index}", "conversations": [{"from": "human", "value": question},
                                                                   {"from": "gpt", "value": "ABCD"[index % 4]}]})
    (directory / "MCUB-4.json").write_text(json.dumps(questions, indent=1) + "\n")
    (directory / "MCUB-answer.json").write_text(json.dumps(answers, indent=1) + "\n")


def write_system(out: Path, *, layers: int, seed: int, tiny: bool, shard_bytes: int, overwrite: bool,
                 device: str = "cpu") -> Path:
    """Write base/, composed/ and mcub/ into `out` (atomically); random values are drawn on `device`."""
    shapes = TINY if tiny else FULL
    started = time.time()
    with atomic_directory(out, overwrite=overwrite) as temporary:
        (temporary / "base").mkdir()
        (temporary / "composed").mkdir()
        write_base(temporary / "base", shapes, layers, seed, shard_bytes, device)
        write_checkpoint_streamed(temporary / "composed", temporary / "base", shapes, seed, device)
        write_mcub(temporary / "mcub", shapes, seed)
        (temporary / "system.json").write_text(json.dumps(
            {"layers": layers, "seed": seed, "tiny": tiny, "drawn_on": device, "written": _now()}, indent=2) + "\n")
    print(f"wrote {out} in {time.time() - started:.0f} s: {model_bytes(out) / 2**30:.2f} GiB of tensors")
    return out


def model_bytes(system: Path) -> int:
    """Bytes of every tensor of the system (base + composed checkpoint), from the safetensors headers."""
    total = 0
    for file in [*weight_files(system / "base"), system / "composed" / TENSOR_FILE]:
        header, _ = safetensors_header(file)
        total += sum(end - begin for begin, end in (info["data_offsets"] for info in header.values()))
    return total


# --- measuring ----------------------------------------------------------------------------------------------
def _status() -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon and RssFile of this process, in bytes."""
    fields = {}
    with open("/proc/self/status") as handle:
        for line in handle:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                fields[key] = int(value.split()[0]) * 1024
    return fields


class PeakSampler:
    """Samples RSS every `interval` seconds and keeps the sample with the largest total, to tell how the peak
    splits into anonymous memory (tensors the process made) and file-backed pages (memory-mapped weights)."""

    def __init__(self, interval: float = 0.05) -> None:
        self.interval, self.peak = interval, _status()
        self.max_anon = self.peak["RssAnon"]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            now = _status()
            self.max_anon = max(self.max_anon, now["RssAnon"])
            if now["VmRSS"] > self.peak["VmRSS"]:
                self.peak = now

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _import_everything() -> None:
    """What every measured path imports, so that the baseline is taken after all imports."""
    import fastapi  # noqa: F401
    import uvicorn  # noqa: F401
    from transformers.models.llama import modeling_llama  # noqa: F401

    import mmcompose.cli
    import mmcompose.eval.runner
    import mmcompose.serve.app  # noqa: F401


def _load_options(args: argparse.Namespace) -> dict[str, Any]:
    options: dict[str, Any] = {"dtype": torch.bfloat16}
    if args.device_map:
        options["device_map"] = args.device_map
    if args.max_memory:
        options["max_memory"] = args.max_memory
    if args.offload_folder:
        options["offload_folder"] = args.offload_folder
    return options


def _cli_options(args: argparse.Namespace) -> list[str]:
    options = ["--dtype", "bfloat16"]
    for flag, value in (("--device-map", args.device_map), ("--max-memory", args.max_memory),
                        ("--offload-folder", args.offload_folder)):
        if value:
            options += [flag, value]
    return options


def _text_prompt(model: MultimodalLLM) -> Any:
    prompt, _ = model.format_conversation([{"from": "human", "value": "Describe a cat in one sentence."}])
    return model.example(prompt)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """One measurement in this process; the caller makes it a fresh one."""
    _import_everything()
    baseline = _status()
    system = Path(args.system)
    result: dict[str, Any] = {"what": args.what}
    started = time.time()
    with PeakSampler() as sampler:
        if args.what in ("load", "fold"):
            model = MultimodalLLM.from_pretrained(system / "composed", **_load_options(args)).eval()
            result["load_s"] = time.time() - started
            result["load_peak_rss"] = _status()["VmHWM"]
            result["loaded_tensor_bytes"] = _touch(model)
            if args.what == "fold":
                model.fold_text_route()
                result["generated"] = model.generate([_text_prompt(model)], max_new_tokens=args.new_tokens)[0]
        elif args.what == "serve":
            result["answer"] = _serve_one(system, args)
        elif args.what == "eval":
            from mmcompose.cli import app

            out = Path(args.scratch) / "eval"
            app(["eval", "--benchmark", "mcub", "--task", str(system / "mcub"), "--model", str(system / "composed"),
                 "-o", str(out), "--max-new-tokens", str(args.new_tokens), "--batch-size", "1",
                 *_cli_options(args)], standalone_mode=False)
            result["predictions"] = [{key: record[key] for key in ("id", "prediction", "error")} for record in
                                     map(json.loads, (out / "predictions.jsonl").read_text().splitlines())]
        else:
            raise SystemExit(f"unknown measurement {args.what!r}")
    result["seconds"] = time.time() - started
    result["children_max_rss"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # DataLoader workers
    own = resource.getrusage(resource.RUSAGE_SELF)
    result["cpu_seconds"] = own.ru_utime + own.ru_stime  # next to wall seconds: how busy the machine was
    final = _status()
    result.update(baseline_rss=baseline["VmRSS"], baseline_anon=baseline["RssAnon"], peak_rss=final["VmHWM"],
                  peak_sample=sampler.peak, max_anon=sampler.max_anon,
                  model_bytes=model_bytes(system))
    result["ratio"] = (final["VmHWM"] - baseline["VmRSS"]) / result["model_bytes"]
    return result


def _touch(model: torch.nn.Module) -> int:
    """Read every byte of every tensor held in memory (weights memory-mapped from safetensors only become
    resident when first read) and return their bytes: the model ready to answer anything."""
    seen, total = set(), 0
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.device.type == "meta" or tensor.data_ptr() in seen:
                continue
            seen.add(tensor.data_ptr())
            total += tensor.numel() * tensor.element_size()
            tensor.view(-1)[:: max(1, 4096 // tensor.element_size())].sum()  # one read per 4 KiB page
    return total


def _serve_one(system: Path, args: argparse.Namespace) -> str:
    """`mmcompose serve` on loopback in this process (main thread), one chat request from a thread, then stop.

    The request is text, so it would leave the encoders' memory-mapped weights unread; the app is therefore
    handed the model after `_touch` (every weight resident, as after a request with all four media), and the
    figure is the server's steady state: the loaded model, folded by `create_app`, after one answer."""
    import signal

    import mmcompose.serve.run
    from mmcompose.cli import app

    create_app = mmcompose.serve.run.create_app

    def touched_app(model: MultimodalLLM, *rest: Any, **options: Any) -> Any:
        _touch(model)
        return create_app(model, *rest, **options)

    mmcompose.serve.run.create_app = touched_app

    port = args.port
    answer: dict[str, Any] = {}

    def client() -> None:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 3600
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"{url}/v1/models", timeout=5).read()
                break
            except OSError:
                time.sleep(0.5)
        body = json.dumps({"model": "composed", "max_tokens": args.new_tokens, "temperature": 0,
                           "messages": [{"role": "user", "content": "Describe a cat in one sentence."}]}).encode()
        request = urllib.request.Request(f"{url}/v1/chat/completions", data=body,
                                         headers={"Content-Type": "application/json"})
        try:
            answer["response"] = json.loads(urllib.request.urlopen(request, timeout=3600).read())
        except OSError as error:
            answer["error"] = str(error)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=client, daemon=True).start()
    with contextlib.suppress(KeyboardInterrupt):
        app(["serve", str(system / "composed"), "--port", str(port), "--request-timeout", "7200", *_cli_options(args)],
            standalone_mode=False)
    if "error" in answer:
        raise SystemExit(f"serve request failed: {answer['error']}")
    return answer["response"]["choices"][0]["message"]["content"]


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Each measurement in a fresh subprocess of this script; a table, and the JSON results if asked."""
    results = []
    for what in args.only.split(","):
        for repeat in range(args.repeats):
            command = [sys.executable, __file__, "measure", what, args.system, "--new-tokens", str(args.new_tokens),
                       "--scratch", str(Path(args.scratch) / f"{what}-{repeat}"), "--port", str(args.port)]
            for flag in ("device_map", "max_memory", "offload_folder"):
                if getattr(args, flag):
                    command += [f"--{flag.replace('_', '-')}", getattr(args, flag)]
            load_before = os.getloadavg()
            print(f"[{_now()}] {what} #{repeat + 1}: {' '.join(command[1:])}", flush=True)
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                print(done.stdout[-2000:], done.stderr[-4000:], file=sys.stderr)
                results.append({"what": what, "failed": done.stderr.strip().splitlines()[-1:]})
                continue
            result = json.loads(done.stdout.strip().splitlines()[-1])
            result.update(load_average=[load_before, os.getloadavg()], command=command[2:], date=_now())
            results.append(result)
            print(_row(result, code=args.code), flush=True)
    if args.results:
        system = json.loads((Path(args.system) / "system.json").read_text())
        Path(args.results).write_text(json.dumps({"machine": machine(), "layers": system["layers"], "code": args.code,
                                                  "results": results}, indent=1) + "\n")
    return results


HEADER = ("| measurement | layers | placement | code | model GiB | held GiB | held / model | anon / file GiB at peak "
          "| wall s (CPU s) | load avg (start / end) |\n|---|---|---|---|---:|---:|---:|---:|---:|---|")


def _placement(command: list[str]) -> str:
    flags = dict(zip(command[::2], command[1::2], strict=False))
    if "--device-map" not in flags:
        return "in memory"
    disk = ", rest on disk" if "--offload-folder" in flags else ""
    return f"device map {flags['--device-map']}, max memory {flags.get('--max-memory', '-')}{disk}"


def _row(result: dict[str, Any], layers: Any = "", code: str = "") -> str:
    """One markdown row; `held` is the peak RSS above the baseline, its split sampled at the peak."""
    gib = 2**30
    placement = _placement(result.get("command", [])[3:])
    if "failed" in result:
        return f"| {result['what']} | {layers} | {placement} | {code} | failed: {' '.join(result['failed'])} |"
    peak = result["peak_sample"]
    held = (result["peak_rss"] - result["baseline_rss"]) / gib
    anon = (peak["RssAnon"] - result.get("baseline_anon", 0)) / gib
    loads = " / ".join(f"{average[0]:.1f}" for average in result.get("load_average", []))
    cpu = f" ({result['cpu_seconds']:.0f})" if "cpu_seconds" in result else ""
    return (f"| {result['what']} | {layers} | {placement} | {code} | {result['model_bytes'] / gib:.2f} | {held:.2f} "
            f"| **{result['ratio']:.3f}x** | {anon:.2f} / {peak['RssFile'] / gib:.2f} | {result['seconds']:.0f}{cpu} "
            f"| {loads} |")


def report(files: list[Path]) -> str:
    """A markdown table of the results in `files` (written by `run --results`), with their commands."""
    lines = [HEADER]
    commands = []
    for file in files:
        data = json.loads(Path(file).read_text())
        for result in data["results"]:
            lines.append(_row(result, data.get("layers", ""), data.get("code", "")))
            if "command" in result:
                commands.append(f"- {result['what']} ({result['date']}): `python benchmarks/realscale.py "
                                f"{' '.join(result['command'])}`")
    machines = sorted({json.loads(Path(file).read_text())["machine"] for file in files})
    return "\n".join([*lines, "", f"- machine: {'; '.join(machines)}", *commands])


def machine() -> str:
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{platform.machine()}, {os.cpu_count()} cores, {total:.1f} GiB RAM, torch {torch.__version__}, "
            f"python {platform.python_version()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    write = sub.add_parser("write", help="Write base/, composed/ and mcub/ into a new directory.")
    write.add_argument("out", type=Path)
    write.add_argument("--layers", type=int, default=16, help="Decoder layers (vicuna-7b has 32).")
    write.add_argument("--seed", type=int, default=0)
    write.add_argument("--tiny", action="store_true", help="Tiny widths of the same layout (seconds, for tests).")
    write.add_argument("--shard-gib", type=float, default=2.0, help="Largest base shard.")
    write.add_argument("--overwrite", action="store_true")
    report_command = sub.add_parser("report", help="A markdown table from `run --results` files.")
    report_command.add_argument("files", nargs="+", type=Path)
    for name, helptext in (("measure", "One measurement in this process; prints one JSON line."),
                           ("run", "Each measurement in a fresh subprocess; prints a table.")):
        command = sub.add_parser(name, help=helptext)
        if name == "measure":
            command.add_argument("what", choices=["load", "fold", "serve", "eval"])
        else:
            command.add_argument("--only", default="load,fold,serve,eval")
            command.add_argument("--repeats", type=int, default=1)
            command.add_argument("--results", help="Write every result as JSON here.")
            command.add_argument("--code", default="", help="What code ran, for the report (e.g. a commit).")
        command.add_argument("system", help="A directory made by `write`.")
        command.add_argument("--new-tokens", type=int, default=4)
        command.add_argument("--scratch", default="/tmp/realscale", help="Where eval writes its predictions.")
        command.add_argument("--port", type=int, default=18431)
        command.add_argument("--device-map", help="auto | balanced | sequential | a JSON map.")
        command.add_argument("--max-memory", help="As mmcompose's --max-memory, e.g. cpu=12GiB.")
        command.add_argument("--offload-folder")
    args = parser.parse_args()
    if args.command == "write":
        write_system(args.out, layers=args.layers, seed=args.seed, tiny=args.tiny,
                     shard_bytes=int(args.shard_gib * 2**30), overwrite=args.overwrite)
    elif args.command == "report":
        print(report(args.files))
    elif args.command == "measure":
        print(json.dumps(measure(args)))
    else:
        run(args)


if __name__ == "__main__":
    main()
