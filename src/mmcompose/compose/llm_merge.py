"""Merge full fine-tunes of one base LLM (plain transformers directories) into one LLM, mergekit-style.

The same merge methods as composition, streamed: each output tensor is `W_base + merge(W_ft - W_base)` computed
in flat chunks read from the memory-mapped inputs (`operators.merge_chunks`), one tensor per worker thread, and
each chunk written straight to its place in the output file, so memory stays at a few chunks per worker whatever
the model size. The output is a transformers directory: `model.safetensors`, or, above `max_shard_size`, shards
`model-0000i-of-0000n.safetensors` with the `model.safetensors.index.json` that `from_pretrained` reads.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import ExitStack
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import torch
from rich.progress import Progress

from mmcompose.compose.config import LLMMergeConfig
from mmcompose.compose.operators import CHUNK, METHODS, merge_chunks
from mmcompose.errors import CompositionError
from mmcompose.files import atomic_directory
from mmcompose.tensorfiles import SafetensorsStream, TensorReader, weight_files

COPIED_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "tokenizer.model")
MAX_SHARD_SIZE = "5GB"
"""Default shard size, mergekit's (5 * 10^9 bytes): a 7B-parameter bf16 LLM becomes three shards, each small enough
to copy or upload on its own. (transformers' `save_pretrained` now defaults to 50GB.)"""
INDEX_FILE = "model.safetensors.index.json"

Item = TypeVar("Item")
Layout = dict[str, tuple[torch.dtype, tuple[int, ...]]]

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string such as `5GB`, `500MB` or `2GiB` (decimal and binary units, as transformers
    reads `max_shard_size`)."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(size), flags=re.IGNORECASE)
        if match is None:
            raise CompositionError(f"shard size {size!r}: give bytes or a number with a unit (5GB, 500MB, 2GiB)")
        value = int(float(match.group(1)) * _UNITS[(match.group(2) or "").upper()])
    if value <= 0:
        raise CompositionError(f"shard size {size!r} must be positive")
    return value


def _nbytes(spec: tuple[torch.dtype, tuple[int, ...]]) -> int:
    dtype, shape = spec
    return torch.empty((), dtype=dtype).element_size() * math.prod(shape)


def plan_shards(layout: Layout, max_shard_size: int) -> list[Layout]:
    """The layout cut, in order, into shards of at most `max_shard_size` bytes of tensor data; a tensor bigger than
    that gets a shard of its own (as transformers does)."""
    shards: list[Layout] = [{}]
    size = 0
    for name, spec in layout.items():
        nbytes = _nbytes(spec)
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append({})
            size = 0
        shards[-1][name] = spec
        size += nbytes
    return shards


def shard_names(count: int) -> list[str]:
    """transformers' weight file names: one `model.safetensors`, or `model-0000i-of-0000n.safetensors`."""
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def merge_llms(config: LLMMergeConfig, out: str | Path, *, max_shard_size: int | str = MAX_SHARD_SIZE,
               overwrite: bool = False, progress: bool = True) -> Path:
    """Merge `config.models`, fine-tunes of `config.base`, by `config.merge` into a transformers directory at `out`
    (atomic: nothing is left there on failure)."""
    base, out = Path(config.base), Path(out)
    shard_bytes = parse_size(max_shard_size)
    lambdas = config.lambdas()
    params = config.method_parameters([entry.density for entry in config.models])
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
        layout = base_reader.layout
        shards = plan_shards(layout, shard_bytes)
        files = shard_names(len(shards))
        file_of = {name: file for file, shard in zip(files, shards, strict=True) for name in shard}

        def merge_into(streams: dict[str, SafetensorsStream], name: str) -> None:
            stream = streams[file_of[name]]
            original = base_reader.get(name)
            if not original.is_floating_point():
                stream.write_part(name, 0, original)
                return
            inputs = [reader.get(name) for reader in tuned]
            for start, chunk in merge_tensor(original, inputs, config.merge, lambdas, params, generator, scratch):
                stream.write_part(name, start, chunk)

        # DARE draws from one generator, so its tensors must be merged one after the other, in file order; others
        # largest first, so that no big tensor is left to one thread at the end
        workers = 1 if METHODS[config.merge].random else torch.get_num_threads()
        names = list(layout) if workers == 1 else sorted(layout, key=lambda n: math.prod(layout[n][1]), reverse=True)
        with atomic_directory(out, overwrite=overwrite) as temporary:
            with ExitStack() as stack:
                streams = {file: stack.enter_context(SafetensorsStream(temporary / file, shard))
                           for file, shard in zip(files, shards, strict=True)}
                bar = stack.enter_context(Progress(disable=not progress, transient=True))
                task = bar.add_task("merging", total=len(layout))
                for _ in parallel(partial(merge_into, streams), names, workers):
                    bar.advance(task)
            if len(files) > 1:
                index = {"metadata": {"total_size": sum(_nbytes(spec) for spec in layout.values())},
                         "weight_map": file_of}
                (temporary / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
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
