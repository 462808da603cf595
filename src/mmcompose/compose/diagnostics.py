"""How much the deltas of several checkpoints interfere, layer by layer: `mmcompose inspect`.

Merging works when the inputs' deltas are small relative to each other's and do not point in opposite
directions; TIES's premise is that sign conflicts between inputs are what a plain sum destroys. Before
picking a merge method or lambdas, it helps to see, for every adapted module of every layer:

* the Frobenius norm of each input's delta (an input is one delta of one checkpoint);
* the cosine similarity of every pair of inputs' deltas, flattened;
* the sign-conflict rate: among the coordinates where at least two inputs are non-zero, the share where
  the non-zero inputs do not all have the same sign. A coordinate of delta ``D`` is non-zero when
  ``|x| > NONZERO_EPS * max|D|``: a relative threshold, so that exact zeros left by TIES / DARE /
  magnitude pruning count as zero while float round-off near zero does not decide a sign. A LoRA product
  has (almost) no zeros, so for LoRA inputs the rate is over all coordinates.

Everything is computed on the *product* ``(alpha / rank) * B @ A`` (or the dense ``weight``), never on
the LoRA factors (the same product has many factorisations), and separately for two groups: *language*
deltas (those serving the ``text`` route; NaiveMC and DAMC both merge these) and *modality* deltas (those
serving only modality routes; only NaiveMC merges these). A delta serving both (``shared``, ``full``) is
counted in both groups.

Checkpoints are read lazily with ``TensorReader``: only one module's products (one per input of
one group) are in memory at a time, whatever the model size. Inputs built on different base LLMs are
refused, as composition refuses them: their deltas live in different coordinate systems, so their cosines
and signs mean nothing even when the shapes agree.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import textwrap
from collections.abc import Iterable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from rich.table import Table

from mmcompose.checkpoint import Manifest, checkpoint_files, read_manifest
from mmcompose.errors import CheckpointError, CompositionError, MMComposeError
from mmcompose.files import atomic_file, atomic_write_text
from mmcompose.model.routed import lora_product
from mmcompose.model.spec import DeltaSpec
from mmcompose.tensorfiles import TensorReader

__all__ = [
    "GROUPS",
    "NONZERO_EPS",
    "DeltaInput",
    "InspectionReport",
    "ModuleRecord",
    "PairCosine",
    "SummaryRow",
    "inspect_checkpoints",
    "plot_report",
    "render_table",
    "require_png",
    "sign_conflict_rate",
    "write_report_json",
]

Group = Literal["language", "modality"]
GROUPS: tuple[Group, ...] = ("language", "modality")
NONZERO_EPS = 1e-6
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


# ------------------------------------------------------------------------------------------------ results


@dataclass(frozen=True)
class DeltaInput:
    """One delta of one checkpoint. `label` ("<checkpoint>/<delta>") is unique within a report."""

    label: str
    checkpoint: str
    delta: str
    kind: str
    routes: tuple[str, ...]
    groups: tuple[Group, ...]


@dataclass(frozen=True)
class PairCosine:
    """Cosine of two inputs' deltas; None when either delta is all zeros (e.g. an untrained LoRA)."""

    a: str
    b: str
    cosine: float | None


@dataclass(frozen=True)
class ModuleRecord:
    """The numbers for one module of one layer, within one group. Keys of `norms` are input labels."""

    group: Group
    layer: int | None
    module: str
    path: str
    norms: dict[str, float]
    cosines: list[PairCosine]
    sign_conflict: float | None

    @property
    def mean_cosine(self) -> float | None:
        return _mean(pair.cosine for pair in self.cosines)


@dataclass(frozen=True)
class SummaryRow:
    """One module type in one group, averaged over layers (None where there was nothing to compare)."""

    group: Group
    module: str
    layers: int
    mean_norms: dict[str, float]
    mean_cosine: float | None
    mean_sign_conflict: float | None


@dataclass(frozen=True)
class InspectionReport:
    """Per-layer records for every group and module, the inputs they refer to, and a per-module summary."""

    checkpoints: dict[str, str]
    base_fingerprint: str
    inputs: list[DeltaInput]
    records: list[ModuleRecord]
    nonzero_eps: float = NONZERO_EPS

    def inputs_in(self, group: Group) -> list[DeltaInput]:
        return [item for item in self.inputs if group in item.groups]

    def module_types(self) -> list[str]:
        """Module types in the order they first appear in the (layer-sorted) records."""
        return list(dict.fromkeys(record.module for record in self.records))

    @property
    def summary(self) -> list[SummaryRow]:
        """Derived from `records` on access, so the two can never disagree."""
        rows = []
        for group in GROUPS:
            for module in self.module_types():
                chosen = [r for r in self.records if r.group == group and r.module == module]
                if not chosen:
                    continue
                labels = dict.fromkeys(label for r in chosen for label in r.norms)
                rows.append(SummaryRow(
                    group=group, module=module, layers=len({r.layer for r in chosen}),
                    mean_norms={label: _mean(r.norms.get(label) for r in chosen) for label in labels},
                    mean_cosine=_mean(pair.cosine for r in chosen for pair in r.cosines),
                    mean_sign_conflict=_mean(r.sign_conflict for r in chosen),
                ))
        return rows

    def to_dict(self) -> dict[str, Any]:
        return {
            "checkpoints": [{"label": label, "path": path} for label, path in self.checkpoints.items()],
            "base_fingerprint": self.base_fingerprint,
            "nonzero_eps": self.nonzero_eps,
            "inputs": [dataclasses.asdict(item) for item in self.inputs],
            "records": [{**dataclasses.asdict(r), "mean_cosine": r.mean_cosine} for r in self.records],
            "summary": [dataclasses.asdict(row) for row in self.summary],
        }


def _mean(values: Iterable[float | None]) -> float | None:
    present = [value for value in values if value is not None]
    return sum(present) / len(present) if present else None


# ---------------------------------------------------------------------------------------------- measures


def sign_conflict_rate(deltas: Sequence[torch.Tensor], eps: float = NONZERO_EPS) -> float | None:
    """Share of coordinates where the non-zero inputs disagree in sign, among those with >= 2 non-zero.

    Non-zero means `|x| > eps * max|D|` for that input's own `D`. None when no coordinate qualifies
    (fewer than two inputs, or inputs that are zero where the others are not).
    """
    if len(deltas) < 2:
        return None
    positive = torch.zeros(deltas[0].shape, dtype=torch.int16)
    negative = torch.zeros(deltas[0].shape, dtype=torch.int16)
    for delta in deltas:
        threshold = eps * float(delta.abs().max()) if delta.numel() else 0.0
        positive += delta > threshold
        negative += delta < -threshold
    eligible = int(((positive + negative) >= 2).sum())
    if eligible == 0:
        return None
    return int(((positive > 0) & (negative > 0)).sum()) / eligible


def _measure(group: Group, path: str, labels: list[str], products: list[torch.Tensor],
             eps: float) -> ModuleRecord:
    norms = {label: float(torch.linalg.vector_norm(p)) for label, p in zip(labels, products, strict=True)}
    cosines = []
    for (i, a), (j, b) in combinations(enumerate(labels), 2):
        scale = norms[a] * norms[b]
        value = float(torch.dot(products[i].reshape(-1), products[j].reshape(-1))) / scale if scale > 0 else None
        cosines.append(PairCosine(a, b, None if value is None else max(-1.0, min(1.0, value))))
    layer, module = _locate(path)
    return ModuleRecord(group=group, layer=layer, module=module, path=path, norms=norms, cosines=cosines,
                        sign_conflict=sign_conflict_rate(products, eps))


def _locate(path: str) -> tuple[int | None, str]:
    """(layer index from `layers.<i>.`, or None; module type = the attribute name, e.g. `q_proj`)."""
    match = _LAYER.search(path)
    return (int(match.group(1)) if match else None), path.rpartition(".")[2]


# ----------------------------------------------------------------------------------------------- reading


class _LazyDelta:
    """One input: where its tensors are, validated from the safetensors headers, products on demand."""

    def __init__(self, item: DeltaInput, spec: DeltaSpec, directory: Path, reader: TensorReader,
                 modules: dict[str, set[str]]) -> None:
        self.item, self.spec, self.reader, self.modules = item, spec, reader, modules
        if not modules:
            raise CheckpointError(f"{directory}: delta {spec.name!r} has no tensors")
        expected = {"lora_A", "lora_B"} if spec.kind == "lora" else {"weight"}
        for path, parts in modules.items():
            if set(parts) != expected:
                raise CheckpointError(f"{directory}: delta {spec.name!r} at {path} has tensors "
                                      f"{sorted(parts)}, expected {sorted(expected)}")
            if spec.kind == "lora":
                a_shape, b_shape = (reader.layout[_name(spec, path, p)][1] for p in ("lora_A", "lora_B"))
                if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != spec.rank or b_shape[1] != spec.rank:
                    raise CheckpointError(f"{directory}: delta {spec.name!r} at {path} has lora_A {tuple(a_shape)} "
                                          f"and lora_B {tuple(b_shape)}, expected rank {spec.rank}")

    def product(self, path: str) -> torch.Tensor:
        if self.spec.kind == "dense":
            return self.reader.get(_name(self.spec, path, "weight")).float()
        a = self.reader.get(_name(self.spec, path, "lora_A")).float()
        b = self.reader.get(_name(self.spec, path, "lora_B")).float()
        return lora_product(a, b, self.spec.alpha / self.spec.rank)


def _name(spec: DeltaSpec, path: str, part: str) -> str:
    return f"deltas.{spec.name}.{path}.{part}"


def _labels(paths: list[Path]) -> list[str]:
    """Directory names; where two checkpoints share one (`runs/a/model`, `runs/b/model`), the shortest tails of
    their paths that tell them apart (`a/model`, `b/model`); numbered only when the paths are the same."""
    parts = [path.resolve().parts for path in paths]
    for depth in range(1, max(map(len, parts)) + 1):
        names = ["/".join(p[-depth:]) or str(path) for p, path in zip(parts, paths, strict=True)]
        if len(set(names)) == len(names):
            return names
    names = [path.resolve().name or str(path) for path in paths]
    return [f"{i}:{name}" for i, name in enumerate(names, 1)]


def _groups(spec: DeltaSpec) -> tuple[Group, ...]:
    modality_routes = [route for route in spec.routes if route != "text"]
    return tuple(group for group, serves in zip(GROUPS, ("text" in spec.routes, bool(modality_routes)), strict=True)
                 if serves)


def _open_deltas(label: str, directory: Path, manifest: Manifest, stack: ExitStack) -> list[_LazyDelta]:
    """Open the checkpoint's tensor files and assign every `deltas.*` tensor to its delta and module."""
    by_name = sorted(manifest.model.deltas, key=lambda d: len(d.name), reverse=True)
    modules: dict[str, dict[str, set[str]]] = {d.name: {} for d in by_name}
    reader = stack.enter_context(TensorReader(checkpoint_files(directory, manifest.files)))
    for tensor in reader.names():
        if not tensor.startswith("deltas."):
            continue
        owner = next((d for d in by_name if tensor.startswith(f"deltas.{d.name}.")), None)
        if owner is None:
            raise CheckpointError(f"{directory}: tensor {tensor} belongs to no delta of the manifest")
        path, _, part = tensor[len(f"deltas.{owner.name}."):].rpartition(".")
        modules[owner.name].setdefault(path, set()).add(part)
    return [_LazyDelta(DeltaInput(label=f"{label}/{spec.name}", checkpoint=label, delta=spec.name, kind=spec.kind,
                                  routes=tuple(spec.routes), groups=_groups(spec)),
                       spec, directory, reader, modules[spec.name])
            for spec in manifest.model.deltas]


def _module_order(manifests: list[Manifest], paths: set[str]) -> list[str]:
    """Layers ascending (unlayered modules last), modules in target_modules order within a layer."""
    targets = list(dict.fromkeys(t for manifest in manifests for t in manifest.model.target_modules))

    def key(path: str) -> tuple[bool, int, int, str]:
        layer, module = _locate(path)
        rank = targets.index(module) if module in targets else len(targets)
        return layer is None, layer or 0, rank, path

    return sorted(paths, key=key)


def inspect_checkpoints(paths: Sequence[str | Path], eps: float = NONZERO_EPS) -> InspectionReport:
    """Measure norms, pairwise cosines and sign conflicts of the deltas of `paths`, module by module.

    Raises `CheckpointError` for an unreadable checkpoint and `CompositionError` when the checkpoints
    were built on different base LLMs (same check, same wording style as composition).
    """
    directories = [Path(path) for path in paths]
    if not directories:
        raise MMComposeError("inspect needs at least one checkpoint")
    manifests = [read_manifest(directory) for directory in directories]
    reference = manifests[0].base.fingerprint
    for directory, manifest in zip(directories, manifests, strict=True):
        if manifest.base.fingerprint != reference:
            raise CompositionError(
                f"{directory} and {directories[0]} were trained on different base LLMs (fingerprints "
                f"{manifest.base.fingerprint[:19]}... and {reference[:19]}...); deltas of different bases "
                "cannot be compared")
    labels = _labels(directories)
    with ExitStack() as stack:
        sources = [source for label, directory, manifest in zip(labels, directories, manifests, strict=True)
                   for source in _open_deltas(label, directory, manifest, stack)]
        if not sources:
            raise CheckpointError("nothing to inspect: none of the checkpoints has LLM deltas (connector-only)")
        records = []
        for path in _module_order(manifests, {p for source in sources for p in source.modules}):
            for group in GROUPS:
                members = [s for s in sources if group in s.item.groups and path in s.modules]
                if not members:
                    continue
                products = [member.product(path) for member in members]
                shapes = {tuple(p.shape) for p in products}
                if len(shapes) > 1:
                    raise CheckpointError(f"{path}: the inputs' deltas have different shapes {sorted(shapes)}")
                records.append(_measure(group, path, [m.item.label for m in members], products, eps))
    return InspectionReport(checkpoints={label: str(d) for label, d in zip(labels, directories, strict=True)},
                            base_fingerprint=reference, inputs=[s.item for s in sources], records=records,
                            nonzero_eps=eps)


# ------------------------------------------------------------------------------------------------ output


def _format(value: float | None, spec: str) -> str:
    return "-" if value is None or math.isnan(value) else format(value, spec)


def render_table(report: InspectionReport) -> Table:
    """Per module type and group, averaged over layers: each checkpoint's delta norms, cosine, conflicts."""
    table = Table(title=f"Delta interference across {len(report.checkpoints)} checkpoint(s)",
                  caption="norm: mean Frobenius norm over layers, per delta; cosine: mean over layers and pairs "
                          "of deltas; sign conflict: share of coordinates (with >= 2 non-zero deltas) where they "
                          "disagree in sign. Deltas serving text and modality routes count in both groups.")
    table.add_column("group")
    table.add_column("module")
    table.add_column("layers", justify="right")
    for checkpoint in report.checkpoints:
        table.add_column(f"norm {checkpoint}", justify="right")
    table.add_column("cosine", justify="right")
    table.add_column("sign conflict", justify="right")
    previous: str | None = None
    for row in report.summary:
        if previous is not None and row.group != previous:
            table.add_section()
        previous = row.group
        cells = ["\n".join(f"{item.delta} {row.mean_norms[item.label]:.4g}" for item in report.inputs
                           if item.checkpoint == checkpoint and item.label in row.mean_norms) or "-"
                 for checkpoint in report.checkpoints]
        table.add_row(row.group, row.module, str(row.layers), *cells, _format(row.mean_cosine, "+.3f"),
                      _format(row.mean_sign_conflict, ".1%"))
    return table


def write_report_json(report: InspectionReport, path: str | Path) -> Path:
    """All per-layer numbers as JSON (None -> null), written atomically."""
    path = Path(path)
    atomic_write_text(path, json.dumps(report.to_dict(), indent=2) + "\n")
    return path


_PANELS = (  # (record attribute, panel title, colour map, value range, colour bar label)
    ("mean_cosine", "mean pairwise cosine", "RdBu_r", (-1.0, 1.0), "cosine similarity"),
    ("sign_conflict", "sign-conflict rate", "magma", (0.0, 1.0), "share of coordinates in conflict"),
)


def _grid(report: InspectionReport, group: Group, attribute: str, layers: list[int | None],
          modules: list[str]) -> np.ndarray:
    """Rows = layers, columns = module types; several paths in one cell are averaged; NaN = nothing."""
    cells: dict[tuple[int, int], list[float]] = {}
    for record in report.records:
        value = getattr(record, attribute)
        if record.group == group and value is not None:
            cells.setdefault((layers.index(record.layer), modules.index(record.module)), []).append(value)
    grid = np.full((len(layers), len(modules)), np.nan)
    for (row, column), values in cells.items():
        grid[row, column] = sum(values) / len(values)
    return grid


def require_png(path: str | Path) -> Path:
    """Refuse a plot name that is not .png up front, before minutes of reading a large model."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise MMComposeError(f"{path}: the plot is a PNG image; give a file name ending in .png")
    return path


def plot_report(report: InspectionReport, path: str | Path) -> Path:
    """A PNG heat map: one row of panels per group (cosine, sign conflict), layers x modules, atomically.

    The sign-conflict title quotes the rate that inputs with independent random signs would give
    (`1 - 2^(1 - n)` for n dense inputs), the baseline a reader needs to tell interference from chance.
    """
    path = require_png(path)
    layers = sorted({r.layer for r in report.records}, key=lambda layer: (layer is None, layer or 0))
    modules = report.module_types()
    annotate = len(layers) * len(modules) <= 160
    figure = Figure(figsize=(2 * (2.0 + 0.75 * len(modules)), 2 * (1.6 + 0.32 * len(layers))), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(GROUPS), len(_PANELS), squeeze=False)
    for row, group in enumerate(GROUPS):
        count = len(report.inputs_in(group))
        for column, (attribute, title, cmap_name, (low, high), bar_label) in enumerate(_PANELS):
            ax = axes[row][column]
            chance = ""
            if attribute == "sign_conflict" and count >= 2:
                chance = f" (independent signs: {1 - 2.0 ** (1 - count):.2f})"
            ax.set_title(f"{group} deltas ({count}): {title}{chance}", fontsize=10)
            if count < 2:
                ax.text(0.5, 0.5, f"{count} {group} delta(s):\nnothing to compare", ha="center", va="center",
                        transform=ax.transAxes, color="dimgray")
                ax.set_xticks([])
                ax.set_yticks([])
                continue
            cmap, norm = colormaps[cmap_name].with_extremes(bad="lightgray"), Normalize(low, high)
            grid = _grid(report, group, attribute, layers, modules)
            image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, norm=norm, aspect="auto",
                              interpolation="nearest")
            ax.set_xticks(range(len(modules)), modules, rotation=45, ha="right", fontsize=8)
            ax.set_yticks(range(len(layers)), ["other" if layer is None else str(layer) for layer in layers],
                          fontsize=8)
            ax.set_xlabel("module")
            ax.set_ylabel("layer")
            figure.colorbar(image, ax=ax, label=bar_label)
            if annotate:
                for (y, x), value in np.ndenumerate(grid):
                    if not math.isnan(value):
                        red, green, blue, _ = cmap(norm(value))
                        dark = 0.299 * red + 0.587 * green + 0.114 * blue < 0.5
                        ax.text(x, y, f"{value:.2f}", ha="center", va="center", fontsize=7,
                                color="white" if dark else "black")
    names = ", ".join(report.checkpoints)
    figure.suptitle(textwrap.fill(f"Delta interference per layer and module: {names}", 90), fontsize=11)
    with atomic_file(path) as temporary:
        figure.savefig(temporary, format="png", dpi=120)
    return path
