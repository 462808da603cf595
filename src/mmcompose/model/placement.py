"""Where a model's tensors live and in what precision: `--device`, `--dtype`, `--device-map`, `--max-memory` and
`--offload-folder`, parsed and checked in one place for `eval`, `chat`, `serve` and the Python API.

Every check here runs before anything large is allocated, on the model built on the meta device, and a wrong
value is one `PlacementError` line naming its flag.

The device map is accelerate's (big-model inference): module paths of the *composed* model (`llm.model.layers.3`,
`branches.image`, ...) to a GPU index, `"cpu"` or `"disk"`. `auto` and `balanced` spread the model evenly over the
GPUs (`get_balanced_memory`, as transformers does for `device_map="auto"`), `sequential` fills GPU 0 first; both
keep every decoder layer and every modality branch whole, so the deltas of a routed linear always sit with their
base weight and an accelerate hook materialises them together.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import convert_file_size_to_int, get_balanced_memory, get_max_memory, infer_auto_device_map
from torch import nn

from mmcompose.errors import MMComposeError
from mmcompose.files import read_json
from mmcompose.tensorfiles import DTYPES, safetensors_header, weight_files

DTYPE_NAMES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
GIB = 1024**3


class PlacementError(MMComposeError):
    """A device, dtype, device map or memory budget that cannot work; the message names the flag."""


def resolve_device(value: str | torch.device | None, flag: str = "--device") -> torch.device:
    """None: the CPU (as transformers loads); `auto`: the first GPU if there is one, else the CPU; `cpu`, `cuda`,
    `cuda:N` or a `torch.device`."""
    if value is None:
        return torch.device("cpu")
    if value == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError):
        raise PlacementError(f"{flag} {value!r}: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise PlacementError(f"{flag} {value}: no CUDA GPU is visible to PyTorch (use --device cpu)")
        index = 0 if device.index is None else device.index
        if index >= count:
            raise PlacementError(f"{flag} {value}: only {count} GPU(s) visible (cuda:0 to cuda:{count - 1})")
        return torch.device("cuda", index)
    if device.type != "cpu":
        raise PlacementError(f"{flag} {value!r}: expected auto, cpu, cuda or cuda:N")
    return device


def stored_dtype(base_path: str | Path) -> torch.dtype:
    """The dtype a base LLM is saved in, as transformers' `dtype="auto"` reads it: `config.json`'s `dtype` (or the
    older `torch_dtype`), else the first floating tensor of its safetensors files."""
    config = read_json(Path(base_path) / "config.json")
    named = config.get("dtype") or config.get("torch_dtype")
    if isinstance(named, str) and named in DTYPE_NAMES:
        return DTYPE_NAMES[named]
    for file in weight_files(Path(base_path)):
        header, _ = safetensors_header(file)
        for info in header.values():
            dtype = DTYPES.get(info["dtype"])
            if dtype is not None and dtype.is_floating_point:
                return dtype
    return torch.float32


def resolve_dtype(value: str | torch.dtype | None, device: torch.device, base_path: str | Path,
                  flag: str = "--dtype") -> torch.dtype:
    """`auto`/None: the base's stored dtype (transformers' `dtype="auto"`), except that a float16 base computes in
    bfloat16 on the CPU. Explicit float16 on the CPU is refused.

    Why: float16 matmuls on the CPU are emulated. Measured on this project's 2-core AMD EPYC (AVX512-BF16, torch
    2.13, one thread, a (64, 2048) x (2048, 2048) linear): float32 15.0 ms, bfloat16 6.0 ms, float16 40.7 ms. bfloat16
    keeps the 16-bit memory of the stored weights (float32 would double it: a 7B model no longer fits 24 GiB) and
    float32's exponent range, so a float16 checkpoint cannot overflow in it. A bfloat16 or float32 base keeps its
    own dtype on the CPU too.
    """
    if value is None or value == "auto":
        stored = stored_dtype(base_path)
        return torch.bfloat16 if stored == torch.float16 and device.type == "cpu" else stored
    if isinstance(value, str):
        dtype = DTYPE_NAMES.get(value.removeprefix("torch."))
        if dtype is None:
            raise PlacementError(f"{flag} {value!r}: expected auto, {', '.join(DTYPE_NAMES)}")
    elif isinstance(value, torch.dtype) and value in DTYPE_NAMES.values():
        dtype = value
    else:
        raise PlacementError(f"{flag} {value!r}: expected auto, {', '.join(DTYPE_NAMES)}")
    if dtype == torch.float16 and device.type == "cpu":
        raise PlacementError(f"{flag} float16 on the CPU: float16 matmuls are emulated there (measured 2.7x slower "
                             f"than float32, 6.7x slower than bfloat16); use bfloat16 (same memory) or float32")
    return dtype


def parse_max_memory(value: str | dict[Any, Any] | None, flag: str = "--max-memory") -> dict[int | str, int] | None:
    """`0=20GiB,1=20GiB,cpu=30GiB` (or such a dict) as accelerate's `max_memory`: GPU index or `cpu` to bytes."""
    if value is None:
        return None
    items = value.items() if isinstance(value, dict) else \
        [part.partition("=")[::2] for part in value.split(",") if part.strip()]
    budget: dict[int | str, int] = {}
    for key, size in items:
        key = str(key).strip().removeprefix("cuda:")
        device: int | str = int(key) if key.isdigit() else key
        if device != "cpu" and not isinstance(device, int):
            raise PlacementError(f"{flag}: device {key!r}: expected a GPU index (0, 1, ...) or cpu")
        if isinstance(device, int) and device >= _gpu_count():
            raise PlacementError(f"{flag}: GPU {device} is not visible ({_gpu_count()} GPU(s))")
        try:
            size = str(size).strip()
            budget[device] = int(size) if size.isdigit() else convert_file_size_to_int(size)
        except ValueError:
            raise PlacementError(f"{flag}: size {size!r} of {key}: expected e.g. 20GiB, 500MB or bytes") from None
    if not budget:
        raise PlacementError(f"{flag} {value!r}: expected DEVICE=SIZE pairs, e.g. 0=20GiB,cpu=30GiB")
    return budget


def parse_device_map(value: str | dict[str, Any] | None, flag: str = "--device-map") -> str | dict[str, Any] | None:
    """A strategy name, a JSON object (text or a `.json` file) of module path to device, or such a dict."""
    if value is None or isinstance(value, dict):
        return value
    if value in STRATEGIES:
        return value
    text = value
    if not value.lstrip().startswith("{"):
        path = Path(value)
        if not path.is_file():
            raise PlacementError(f"{flag} {value!r}: expected {', '.join(STRATEGIES)}, a JSON object or a JSON file")
        text = path.read_text()
    try:
        mapping = json.loads(text)
    except json.JSONDecodeError as error:
        raise PlacementError(f"{flag}: invalid JSON ({error})") from None
    if not isinstance(mapping, dict) or not mapping:
        raise PlacementError(f"{flag}: expected a JSON object of module path to device")
    return mapping


def _gpu_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _map_device(value: Any, key: str, flag: str) -> int | str:
    """One device-map value as accelerate writes it: a GPU index, `cpu` or `disk`."""
    if value in ("cpu", "disk"):
        return value
    if (isinstance(value, int) and not isinstance(value, bool)) or (isinstance(value, str) and value.isdigit()):
        index = int(value)
    elif isinstance(value, str) and re.fullmatch(r"cuda(:\d+)?", value):
        index = int(value.partition(":")[2] or 0)
    else:
        raise PlacementError(f"{flag}: {key!r} -> {value!r}: expected a GPU index, cuda:N, cpu or disk")
    if index >= _gpu_count():
        raise PlacementError(f"{flag}: {key!r} -> {value!r}: no such GPU ({_gpu_count()} visible)")
    return index


@dataclass
class Placement:
    """Resolved placement: the execution `device` (where inputs go first), the `dtype` of the LLM and the
    branches, and accelerate's `device_map` over the composed model (None: everything on `device`)."""

    device: torch.device
    dtype: torch.dtype
    device_map: dict[str, int | str] | None = None
    offload_folder: Path | None = None
    no_split: list[str] = field(default_factory=list)

    def device_of(self, path: str) -> int | str | torch.device:
        """Where the tensor or module at `path` of the composed model goes (the longest matching map entry)."""
        if self.device_map is None:
            return self.device
        parts = path.split(".")
        for end in range(len(parts), -1, -1):
            key = ".".join(parts[:end])
            if key in self.device_map:
                return self.device_map[key]
        raise KeyError(path)

    def submap(self, prefix: str) -> dict[str, int | str] | None:
        """The map restricted to the submodule `prefix`, with paths relative to it (transformers' `device_map`)."""
        if self.device_map is None:
            return None
        inner = {key[len(prefix) + 1:]: device for key, device in self.device_map.items()
                 if key.startswith(prefix + ".")}
        try:
            return {"": self.device_of(prefix), **inner}  # a parent's entry covers what no inner key names
        except KeyError:
            return inner


def plan_placement(model: nn.Module, *, device: str | torch.device | None, dtype: torch.dtype,
                   device_map: str | dict[str, Any] | None, max_memory: str | dict[Any, Any] | None,
                   offload_folder: str | Path | None, no_split: list[str]) -> Placement:
    """Resolve the placement of `model` (built on the meta device in `dtype`): validate a given map against its
    modules, or infer one with accelerate, and check that it fits the budget, before any weight is loaded."""
    device_map = parse_device_map(device_map)
    budget = parse_max_memory(max_memory)
    folder = Path(offload_folder) if offload_folder is not None else None
    if device_map is None:
        if budget is not None:
            raise PlacementError("--max-memory goes with --device-map auto|balanced|sequential")
        if folder is not None:
            raise PlacementError("--offload-folder goes with --device-map (a map that puts some weights on disk)")
        return Placement(resolve_device(device), dtype, no_split=no_split)
    if device not in (None, "auto"):
        raise PlacementError(f"--device {device} and --device-map: give one (the map says where every layer goes)")
    if isinstance(device_map, str):
        resolved = _infer_map(model, device_map, budget, dtype, no_split)
        flag = "--max-memory" if budget is not None else "--device-map"
    else:
        if budget is not None:
            raise PlacementError("--max-memory goes with --device-map auto|balanced|sequential, not with a JSON map")
        resolved = _check_map(model, device_map, no_split)
        flag = "--device-map"
    if "disk" in resolved.values() and folder is None:
        on_disk = sum(_size(model, key) for key, place in resolved.items() if place == "disk")
        raise PlacementError(f"{flag}: {on_disk / GIB:.2f} GiB of the model would go to the disk; "
                             f"pass --offload-folder DIR to allow it" +
                             (" or raise the budget" if flag == "--max-memory" else ""))
    gpus = sorted(place for place in resolved.values() if isinstance(place, int))
    main = torch.device("cuda", gpus[0]) if gpus else torch.device("cpu")
    return Placement(main, dtype, resolved, folder, no_split)


def _size(model: nn.Module, key: str) -> int:
    """Bytes of the parameters and buffers of `model`'s submodule `key` (meta tensors included)."""
    module = model.get_submodule(key) if key else model
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def _infer_map(model: nn.Module, strategy: str, budget: dict[int | str, int] | None, dtype: torch.dtype,
               no_split: list[str]) -> dict[str, int | str]:
    try:
        limits = get_max_memory(budget)
        if strategy != "sequential" and _gpu_count() > 1:
            limits = get_balanced_memory(model, max_memory=limits, no_split_module_classes=no_split, dtype=dtype,
                                         low_zero=strategy == "balanced_low_0")
        inferred = infer_auto_device_map(model, max_memory=limits, no_split_module_classes=no_split, dtype=dtype)
    except ValueError as error:
        raise PlacementError(f"--max-memory: {error}") from None
    return {key: place if place in ("cpu", "disk") else int(place) for key, place in inferred.items()}


def _check_map(model: nn.Module, mapping: dict[str, Any], no_split: list[str],
               flag: str = "--device-map") -> dict[str, int | str]:
    """A user's map: every key a module of the composed model, none inside a layer that must stay whole, every
    tensor covered by exactly the longest matching key."""
    modules = dict(model.named_modules())
    resolved: dict[str, int | str] = {}
    for key, value in mapping.items():
        if key not in modules:
            top = sorted({name.split(".")[0] for name in modules if name})
            raise PlacementError(f"{flag}: {key!r} is not a module of the model (paths start with "
                                 f"{' or '.join(top)}, e.g. llm.model.layers.0)")
        resolved[key] = _map_device(value, key, flag)
    for name, module in modules.items():
        if type(module).__name__ in no_split:
            inside = [key for key in resolved if key.startswith(name + ".")]
            if inside:
                raise PlacementError(f"{flag}: {inside[0]!r} splits {name} ({type(module).__name__}), which must "
                                     f"stay whole on one device; map {name!r} instead")
    placement = Placement(torch.device("cpu"), torch.float32, resolved)
    for name, _ in [*model.named_parameters(), *model.named_buffers()]:
        try:
            placement.device_of(name)
        except KeyError:
            raise PlacementError(f"{flag}: does not cover {name.rpartition('.')[0]} (add it, or a module "
                                 f"containing it)") from None
    return _disjoint(model, resolved, flag)


def _disjoint(model: nn.Module, mapping: dict[str, int | str], flag: str) -> dict[str, int | str]:
    """The same placement with no key inside another (`{"": "cpu", "llm.model.layers.3": "disk"}` becomes one
    entry per child of each parent down to the inner key): accelerate's hooks on a parent would otherwise
    place its children's weights, offloaded ones included."""
    result = dict(mapping)
    parent = next((key for key in result if any(other != key and (key == "" or other.startswith(key + "."))
                                                for other in result)), None)
    while parent is not None:
        module = model.get_submodule(parent) if parent else model
        if next(module.named_parameters(recurse=False), None) or next(module.named_buffers(recurse=False), None):
            raise PlacementError(f"{flag}: {parent!r} holds weights of its own, so its submodules cannot be placed "
                                 f"apart from it")
        device = result.pop(parent)
        for name, _ in module.named_children():
            result.setdefault(f"{parent}.{name}" if parent else name, device)
        parent = next((key for key in result if any(other != key and (key == "" or other.startswith(key + "."))
                                                    for other in result)), None)
    return result
