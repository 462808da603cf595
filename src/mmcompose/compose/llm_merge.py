"""Merge full fine-tunes of one base LLM (plain transformers directories) into one LLM, mergekit-style.

The same operators as composition, streamed: each output tensor is `W_base + merge(W_ft - W_base)` computed in
flat chunks read from the memory-mapped inputs (`operators.merge_chunks`), one tensor per worker thread, and each
chunk written straight to its place in the output file, so memory stays at a few chunks per worker whatever the
model size.
"""

from __future__ import annotations

import math
import shutil
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import torch
from rich.progress import Progress

from mmcompose.compose.config import CompositionConfig
from mmcompose.compose.operators import CHUNK, OPERATORS, merge_chunks
from mmcompose.errors import CompositionError
from mmcompose.files import atomic_directory
from mmcompose.tensorfiles import SafetensorsStream, TensorReader, weight_files

COPIED_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "tokenizer.model")

Item = TypeVar("Item")


def merge_llms(base: str | Path, config: CompositionConfig, out: str | Path, *, overwrite: bool = False,
               progress: bool = True) -> Path:
    """`config.models` are fine-tunes of `base`; `config.merge` and its parameters say how to merge them."""
    base, out = Path(base), Path(out)
    if config.merge not in OPERATORS:
        raise CompositionError(f"merge {config.merge!r} needs LoRA inputs; full fine-tunes take "
                               f"{', '.join(sorted(OPERATORS))}")
    lambdas = [1.0 / len(config.models) if e.lambda_ is None else e.lambda_ for e in config.models]
    params = dict(config.parameters)
    if any(e.density is not None for e in config.models):
        params["density"] = [params.get("density") if e.density is None else e.density for e in config.models]
    readers = [TensorReader(weight_files(base))]
    try:
        readers += [TensorReader(weight_files(entry.path)) for entry in config.models]
        base_reader, tuned = readers[0], readers[1:]
        for entry, reader in zip(config.models, tuned, strict=True):
            if reader.layout != base_reader.layout:
                different = sorted(set(reader.layout.items()) ^ set(base_reader.layout.items()))[0][0]
                raise CompositionError(f"{entry.path} is not a fine-tune of {base}: tensor {different} differs "
                                       "in name, dtype or shape")
        generator = torch.Generator().manual_seed(config.seed)
        scratch = Scratch()

        def merge_into(stream: SafetensorsStream, name: str) -> None:
            original = base_reader.get(name)
            if not original.is_floating_point():
                stream.write_part(name, 0, original)
                return
            inputs = [reader.get(name) for reader in tuned]
            for start, chunk in merge_tensor(original, inputs, config.merge, lambdas, params, generator, scratch):
                stream.write_part(name, start, chunk)

        # DARE draws from one generator, so its tensors must be merged one after the other, in file order; others
        # largest first, so that no big tensor is left to one thread at the end
        layout = base_reader.layout
        workers = 1 if OPERATORS[config.merge].random else torch.get_num_threads()
        names = list(layout) if workers == 1 else sorted(layout, key=lambda n: math.prod(layout[n][1]), reverse=True)
        with atomic_directory(out, overwrite=overwrite) as temporary:
            with SafetensorsStream(temporary / "model.safetensors", layout) as stream, \
                    Progress(disable=not progress, transient=True) as bar:
                task = bar.add_task("merging", total=len(layout))
                for _ in parallel(partial(merge_into, stream), names, workers):
                    bar.advance(task)
            for file in COPIED_FILES:
                if (base / file).is_file():
                    shutil.copy2(base / file, temporary / file)
    finally:
        for reader in readers:
            reader.close()
    return out


class Scratch(threading.local):
    """Buffers per thread, reused for every chunk of every tensor that thread merges.

    Memory that malloc hands back to the kernel costs a page fault per 4 KiB when touched again (~4 us in a VM),
    and fresh buffers per chunk or per tensor measured 2-3x slower than the merge arithmetic itself.
    """

    def __init__(self) -> None:
        self.buffers: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def get(self, key: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
        buffer = self.buffers.get((key, dtype))
        if buffer is None or buffer.numel() < numel:
            buffer = self.buffers[key, dtype] = torch.empty(numel, dtype=dtype)
        return buffer[:numel]


def merge_tensor(base: torch.Tensor, tuned: list[torch.Tensor], merge: str, lambdas: list[float],
                 params: dict[str, Any], generator: torch.Generator,
                 scratch: Scratch | None = None) -> Iterator[tuple[int, torch.Tensor]]:
    """`base + merge(tuned_m - base)` as (flat start, chunk) pairs covering the tensor in order, in its dtype;
    a chunk may live in `scratch` and is valid until the next one is requested.

    Deltas are computed chunk by chunk in float32 (float64 if an input is float64) from the inputs as they are
    (typically memory-mapped bf16), so no input is ever converted or copied whole.
    """
    scratch = scratch or Scratch()
    flat_base = base.reshape(-1)
    flat_tuned = [t.reshape(-1) for t in tuned]
    compute = torch.float64 if torch.float64 in {base.dtype, *(t.dtype for t in tuned)} else torch.float32
    size, count = min(CHUNK, flat_base.numel()), len(tuned)

    def deltas(start: int, stop: int) -> torch.Tensor:
        if stop - start > size:  # the whole tensor at once (DARE): too big to keep around
            chunk, reference = torch.empty(count, stop - start, dtype=compute), flat_base[start:stop].to(compute)
        else:
            chunk = scratch.get("deltas", count * (stop - start), compute).view(count, stop - start)
            reference = scratch.get("base", stop - start, compute).copy_(flat_base[start:stop])
        for row, other in zip(chunk, flat_tuned, strict=True):
            torch.sub(other[start:stop], reference, out=row)
        return chunk

    start = 0
    for merged in merge_chunks(merge, deltas, flat_base.numel(), lambdas, params, generator):
        stop = start + merged.numel()
        merged.add_(flat_base[start:stop])
        fresh = merged.numel() > size
        yield start, merged.to(base.dtype) if fresh else scratch.get("out", stop - start, base.dtype).copy_(merged)
        start = stop


def parallel(function: Callable[[Item], None], items: Iterable[Item], workers: int) -> Iterator[None]:
    """Run `function` on every item on `workers` threads, started in order; yield as each one finishes.

    Each thread runs its torch ops on one core: torch's own intra-op threads meet at a barrier after every op,
    and when another process holds a core that barrier costs a scheduler time slice per op (measured: a 2-thread
    elementwise op 25x slower than a 1-thread one on a 2-core machine with one busy core). Whole items per thread
    never wait for each other.
    """
    if workers <= 1:
        for item in items:
            yield function(item)
        return
    previous = torch.get_num_threads()
    try:
        with ThreadPoolExecutor(workers, initializer=torch.set_num_threads, initargs=(1,)) as pool:
            futures = [pool.submit(function, item) for item in items]
            try:
                for future in as_completed(futures):
                    yield future.result()
            finally:  # after a failure, do not wait for the items not yet started
                for future in futures:
                    future.cancel()
    finally:
        torch.set_num_threads(previous)  # set_num_threads(1) in the workers also set the default for new threads
