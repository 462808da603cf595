"""Tensor files: the one reader (`TensorReader`, lazy, tensor by tensor, so composition's peak memory stays
near one tensor per input), the one writer (`SafetensorsStream`), the base LLM's fingerprint, and the strict
comparison of a tensor set against what a model expects.

Reading uses safetensors' lazy `safe_open`; foreign PyTorch pickles are only ever read with
`torch.load(weights_only=True)` (`load_state_dict`). The safetensors Python API can only write a whole dict at
once, so `SafetensorsStream` writes the format directly: the 8-byte little-endian header length, the JSON
header with every tensor's dtype, shape and byte offsets (known before any data, because composition
knows its output shapes in advance), then each tensor's raw bytes at its offset.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import struct
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import ExitStack
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from mmcompose.errors import CheckpointError, preview


def safetensors_header(path: Path) -> tuple[dict, int]:
    """The JSON header of a safetensors file and the byte offset where its data starts."""
    with open(path, "rb") as handle:
        raw = handle.read(8)
        if len(raw) != 8:
            raise CheckpointError(f"{path}: not a safetensors file (shorter than its header length)")
        (size,) = struct.unpack("<Q", raw)
        if size > 100_000_000:
            raise CheckpointError(f"{path}: not a safetensors file (header length {size})")
        try:
            header = json.loads(handle.read(size))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise CheckpointError(f"{path}: not a safetensors file (unreadable header)") from None
    header.pop("__metadata__", None)
    return header, 8 + size


def weight_files(directory: Path) -> list[Path]:
    files = sorted(Path(directory).glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{directory}: no *.safetensors weights (convert .bin weights to safetensors first)")
    return files


DTYPE_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
DTYPES = {name: dtype for dtype, name in DTYPE_NAMES.items()}


class TensorReader:
    """Lazy access to the tensors of several safetensors files, by name, one tensor at a time.

    Unreadable files, a name in two files and unsupported dtypes are `CheckpointError`s, raised on opening.
    """

    def __init__(self, files: Sequence[Path]) -> None:
        self._stack = ExitStack()
        self._where: dict[str, object] = {}
        self.layout: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
        self.file_of: dict[str, Path] = {}
        try:
            for file in files:
                self._open(Path(file))
        except BaseException:
            self._stack.close()
            raise

    def _open(self, file: Path) -> None:
        try:
            header, _ = safetensors_header(file)
            handle = self._stack.enter_context(safe_open(str(file), framework="pt"))
        except (SafetensorError, OSError) as error:
            raise CheckpointError(f"{file}: unreadable safetensors file ({error})") from None
        for name, info in header.items():
            if name in self._where:
                raise CheckpointError(f"{file}: tensor {name} also appears in another file")
            self._where[name] = handle
            self.file_of[name] = file
            if info["dtype"] not in DTYPES:
                raise CheckpointError(f"{file}: tensor {name} has unsupported dtype {info['dtype']}")
            self.layout[name] = (DTYPES[info["dtype"]], tuple(info["shape"]))

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def names(self) -> Iterator[str]:
        return iter(self.layout)

    def get(self, name: str) -> torch.Tensor:
        return self._where[name].get_tensor(name)

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> TensorReader:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.close()


def read_tensors(files: Sequence[Path]) -> dict[str, torch.Tensor]:
    """Every tensor of `files` at once (through `TensorReader`, so with its checks)."""
    with TensorReader(files) as reader:
        return {name: reader.get(name) for name in reader.names()}


def checkpoint_files(directory: Path, names: Iterable[str]) -> list[Path]:
    """The tensor files a checkpoint's manifest lists, each checked to exist."""
    paths = []
    for name in names:
        path = Path(directory) / name
        if not path.is_file():
            raise CheckpointError(f"{directory}: tensor file {name} listed in the manifest is missing")
        paths.append(path)
    return paths


def load_pickle(path: Path) -> Any:
    """A PyTorch file's contents, unpickled with `weights_only=True` only: tensors and plain containers (a
    checkpoint's config dict too), never code. Anything else is refused with a one-line error."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(f"{path}: refused: the pickle holds objects other than tensors, and mmcompose only "
                              f"unpickles with weights_only=True (convert it to safetensors with a tool you trust)"
                              ) from None
    except (RuntimeError, EOFError, OSError) as error:
        raise CheckpointError(f"{path}: unreadable PyTorch file ({str(error).splitlines()[0]})") from None


def load_state_dict(path: Path, *, unwrap: str | None = None) -> dict[str, torch.Tensor]:
    """Tensors of a foreign `.safetensors` file or pickled state dict. A pickle is only ever read with
    `weights_only=True`: one that holds anything but tensors and plain containers is refused, never run.
    `unwrap` names a top-level entry holding the state dict, taken when present (training checkpoints)."""
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        return read_tensors([path])
    state = load_pickle(path)
    if unwrap is not None and isinstance(state, dict) and isinstance(state.get(unwrap), dict):
        state = state[unwrap]
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a state dict, found a {type(state).__name__}")
    for name, value in state.items():
        if not isinstance(name, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path}: entry {name!r} is a {type(value).__name__}, not a tensor")
    return state


WINDOWS, WINDOW_BYTES = 64, 64


def fingerprint_base(directory: str | Path) -> str:
    """`sha256:<hex>` over every tensor of a base LLM's safetensors files, in name order, without loading them.

    Hashing every byte of a 7B model costs a minute; composition only needs to tell different bases apart,
    and two different bases (or a base and a fine-tune) differ almost everywhere. So the fingerprint hashes
    each tensor's name, dtype and shape plus 64 evenly spaced 64-byte windows of its data. It detects a
    different base, not a single flipped bit.
    """
    entries: dict[str, tuple[Path, int, dict]] = {}
    for file in weight_files(Path(directory)):
        header, data_start = safetensors_header(file)
        for name, info in header.items():
            entries[name] = (file, data_start, info)
    digest = hashlib.sha256()
    handles: dict[Path, object] = {}
    try:
        for name in sorted(entries):
            file, data_start, info = entries[name]
            handle = handles.setdefault(file, open(file, "rb"))  # noqa: SIM115 - closed in finally
            begin, end = info["data_offsets"]
            digest.update(f"{name}|{info['dtype']}|{info['shape']}|".encode())
            span = end - begin
            step = max(span // WINDOWS, 1)
            for offset in range(0, span, step)[:WINDOWS]:
                handle.seek(data_start + begin + offset)
                digest.update(handle.read(min(WINDOW_BYTES, span - offset)))
    finally:
        for handle in handles.values():
            handle.close()
    return "sha256:" + digest.hexdigest()


def check_tensor_set(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor],
                     where: str = "checkpoint") -> None:
    """Strict comparison of a tensor set against what a model expects: the one place that words the errors."""
    missing, unexpected = expected.keys() - found.keys(), found.keys() - expected.keys()
    if missing:
        raise CheckpointError(f"{where}: {len(missing)} missing tensor(s): {preview(missing)}")
    if unexpected:
        raise CheckpointError(f"{where}: {len(unexpected)} unexpected tensor(s): {preview(unexpected)}")
    for name, target in expected.items():
        value = found[name]
        if value.shape != target.shape:
            raise CheckpointError(f"{where}: tensor {name} has shape {tuple(value.shape)}, "
                                  f"expected {tuple(target.shape)}")
        if value.dtype != target.dtype:
            raise CheckpointError(f"{where}: tensor {name} has dtype {value.dtype}, expected {target.dtype}")


class SafetensorsStream:
    """Write a safetensors file whose layout is declared up front: whole tensors one by one, in layout order
    (`write`), or flat parts of tensors at their place in the file, in any order and from any thread
    (`write_part`, so parallel producers need no buffer to put their results back in order)."""

    def __init__(self, path: Path, layout: dict[str, tuple[torch.dtype, tuple[int, ...]]]) -> None:
        self.layout = layout
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        self._places: dict[str, tuple[int, int]] = {}
        offset = 0
        for name, (dtype, shape) in layout.items():
            size = torch.empty((), dtype=dtype).element_size() * math.prod(shape)
            header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            self._places[name] = (offset, offset + size)
            offset += size
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # keep the data 8-byte aligned, as safetensors does
        self._data = 8 + len(encoded)
        self._unwritten = {name: stop - start for name, (start, stop) in self._places.items()}
        self._lock = threading.Lock()
        self._fd: int | None = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        self._pwrite(struct.pack("<Q", len(encoded)) + encoded, 0)
        self._pending = iter(layout)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write the next tensor of the layout, whole."""
        expected = next(self._pending, None)
        dtype, shape = self.layout.get(name, (None, None))
        if name != expected or tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise RuntimeError(f"stream expected {expected} {dtype} {shape}, got {name} {tensor.dtype} "
                               f"{tuple(tensor.shape)}")
        self.write_part(name, 0, tensor)

    def write_part(self, name: str, start: int, part: torch.Tensor) -> None:
        """Write `part` as the flat entries `[start, start + part.numel())` of tensor `name`."""
        dtype, shape = self.layout[name]
        begin, end = self._places[name]
        data = part.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
        offset = begin + start * part.element_size()
        if part.dtype != dtype or start < 0 or offset + len(data) > end:
            raise RuntimeError(f"stream: {name} ({dtype}, {shape}) has no entries [{start}, {start + part.numel()}) "
                               f"of {part.dtype}")
        self._pwrite(data, self._data + offset)
        with self._lock:
            self._unwritten[name] -= len(data)

    def _pwrite(self, data: bytes | np.ndarray, offset: int) -> None:
        done = 0
        while done < len(data):
            done += os.pwrite(self._fd, data[done:], offset + done)

    def close(self) -> None:
        self._release()
        incomplete = next((name for name, left in self._unwritten.items() if left), None)
        if incomplete is not None:
            raise RuntimeError(f"stream closed before tensor {incomplete} was written")

    def __enter__(self) -> SafetensorsStream:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 trace: TracebackType | None) -> None:
        if kind is None:
            self.close()
        else:
            self._release()

    def _release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
