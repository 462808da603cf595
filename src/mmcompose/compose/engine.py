"""Composition: several modality models on one base LLM -> one model with all their modalities.

Pure in the mergekit sense: manifests and tensors in, a manifest and tensors out, streamed tensor by tensor.

* `naive` (NaiveMC): every route uses the merge of the inputs' deltas (inputs must have one delta
  serving all their routes: `shared` or `full` models).
* `damc` (DAMC): each modality route keeps its own modality delta at full strength; the text route uses
  the merge of the inputs' language deltas. A `shared` model's single delta serves as both parts. A delta
  that serves several modalities of one model (Video-LLaVA's LLM change serves image and video) stays ONE
  delta on all their routes, named after the first of them, rather than a copy per modality.

Merges act on product deltas `(alpha/rank) B @ A` or dense deltas. `linear` on LoRA inputs stays exactly
low-rank (factors concatenated, rank = sum of ranks); other operators give a dense delta; the legacy
`factorwise_mean` averages A and B separately as the official ModelCompose code did.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.progress import Progress

from mmcompose.checkpoint import (
    MANIFEST_NAME,
    TENSOR_FILE,
    BaseReference,
    Manifest,
    base_reference,
    checkpoint_files,
    read_manifest,
    resolve_base,
    write_manifest,
)
from mmcompose.compose.config import LEGACY_MERGE, CompositionConfig, ModelEntry
from mmcompose.compose.operators import METHODS, factorwise_mean, lora_concat
from mmcompose.errors import CheckpointError, CompositionError
from mmcompose.files import atomic_directory
from mmcompose.model.routed import lora_product
from mmcompose.model.spec import DeltaSpec, ModalitySpec, ModelSpec
from mmcompose.tensorfiles import SafetensorsStream, TensorReader

Layout = dict[str, tuple[torch.dtype, tuple[int, ...]]]


@dataclass
class Source:
    """One input model: its manifest, lazily readable tensors, and how it enters the composition."""

    directory: Path
    manifest: Manifest
    reader: TensorReader
    name: str
    weight: float
    density: float | None
    renames: dict[str, str]
    record: dict[str, Any]  # how the output's provenance names this input (so it can be found again)
    consumed: set[str] = field(default_factory=set)

    def delta_for(self, route: str) -> DeltaSpec | None:
        return next((d for d in self.manifest.model.deltas if route in d.routes), None)

    def read(self, name: str) -> torch.Tensor:
        self.consumed.add(name)
        return self.reader.get(name)


def manifest_digest(directory: Path) -> str:
    return "sha256:" + hashlib.sha256((directory / MANIFEST_NAME).read_bytes()).hexdigest()


def model_name(entry: ModelEntry, manifest: Manifest) -> str:
    """A model's name in lambdas and provenance: given, else its (renamed) modalities, e.g. `image+audio`."""
    renamed = [entry.rename.get(m.name, m.name) for m in manifest.model.modalities]
    return entry.name or "+".join(renamed) or entry.path.name


def open_source(entry: ModelEntry, index: int) -> Source:
    manifest = read_manifest(entry.path)
    modalities = [m.name for m in manifest.model.modalities]
    unknown = set(entry.rename) - set(modalities)
    if unknown:
        raise CompositionError(f"models[{index}] ({entry.path}): rename names modality {sorted(unknown)[0]!r}, "
                               f"which it does not have (it has: {', '.join(modalities) or 'none'})")
    renamed = [entry.rename.get(m, m) for m in modalities]
    name = model_name(entry, manifest)
    reader = TensorReader(checkpoint_files(entry.path, manifest.files))
    record = {"path": str(entry.path.resolve()), "rename": dict(entry.rename), "modalities": renamed,
              "manifest": manifest_digest(entry.path)}
    return Source(entry.path, manifest, reader, name, 0.0, entry.density, dict(entry.rename), record)


def _assign_roles(config: CompositionConfig, sources: list[Source]) -> None:
    """Check modality ownership and model names, then give each source its lambda."""
    owners: dict[str, Source] = {}
    for source in sources:
        for modality in source.manifest.model.modalities:
            new = source.renames.get(modality.name, modality.name)
            if new in owners:
                raise CompositionError(
                    f"modality {new!r} comes from both {owners[new].directory} and {source.directory}; "
                    f"rename one (rename: {{{modality.name}: other_name}})")
            owners[new] = source
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise CompositionError(f"two models share the name {next(n for n in names if names.count(n) > 1)!r}; "
                               "give one a distinct `name`")
    unknown = set(config.lambdas) - set(names)
    if unknown:
        raise CompositionError(f"lambdas: key {sorted(unknown)[0]!r} names no model (models: {', '.join(names)})")
    for source, entry in zip(sources, config.models, strict=True):
        if entry.lambda_ is not None and source.name in config.lambdas:
            raise CompositionError(f"model {source.name!r} has a lambda both in models and in lambdas; keep one")
        given = entry.lambda_ if entry.lambda_ is not None else config.lambdas.get(source.name)
        source.weight = 1.0 / len(sources) if given is None else given
        source.record["lambda_explicit"] = given is not None


def _check_tensor_names(source: Source) -> None:
    """Before reading any data: every delta has its full set of tensors on the same modules, and nothing
    in the files is outside the manifest's modalities and deltas."""
    spec = source.manifest.model
    paths: dict[str, set[str]] = {}
    known_modalities = {f"modalities.{m.name}." for m in spec.modalities}
    for name in source.reader.names():
        if any(name.startswith(prefix) for prefix in known_modalities):
            continue
        delta_name, _, rest = name.removeprefix("deltas.").partition(".")
        delta = next((d for d in spec.deltas if d.name == delta_name), None)
        if not name.startswith("deltas.") or delta is None:
            raise CheckpointError(f"{source.directory}: unexpected tensor {name} (not in the manifest)")
        paths.setdefault(delta_name, set()).add(rest.rpartition(".")[0])
    every_path = set().union(*paths.values()) if paths else set()
    for delta in spec.deltas:
        for path in sorted(every_path):
            for tensor in _input_names(delta, path):
                if tensor not in source.reader:
                    raise CheckpointError(f"{source.directory}: missing tensor {tensor}")


def _check_compatible(sources: list[Source]) -> None:
    for source in sources:
        _check_tensor_names(source)
    first = sources[0]
    for source in sources[1:]:
        if source.manifest.base.fingerprint != first.manifest.base.fingerprint:
            raise CompositionError(
                f"{source.directory} and {first.directory} were trained on different base LLMs (fingerprints "
                f"{source.manifest.base.fingerprint[:19]}... and {first.manifest.base.fingerprint[:19]}...); "
                "composition needs one shared base")
        for attribute in ("template", "chat_template", "target_modules"):
            if getattr(source.manifest.model, attribute) != getattr(first.manifest.model, attribute):
                raise CompositionError(f"{source.directory} and {first.directory} differ in {attribute}")


def _merged_delta(config: CompositionConfig, parts: list[tuple[Source, DeltaSpec]], name: str,
                  routes: list[str]) -> DeltaSpec:
    """The spec of the merged delta: exactly low-rank where the result is, else dense."""
    lora = all(d.kind == "lora" for _, d in parts)
    if config.merge == LEGACY_MERGE:
        ranks, alphas = {d.rank for _, d in parts}, {d.alpha for _, d in parts}
        if not lora or len(ranks) != 1 or len(alphas) != 1:
            raise CompositionError(f"merge {LEGACY_MERGE!r} needs LoRA inputs of one rank and alpha")
        return DeltaSpec(name=name, kind="lora", routes=routes, rank=ranks.pop(), alpha=alphas.pop())
    if config.merge == "linear" and lora:
        rank = sum(d.rank for _, d in parts)
        return DeltaSpec(name=name, kind="lora", routes=routes, rank=rank, alpha=float(rank))
    return DeltaSpec(name=name, kind="dense", routes=routes)


@dataclass
class Plan:
    spec: ModelSpec
    layout: Layout
    producers: dict[str, Any]
    merged_paths: list[str]


def _module_paths(source: Source, delta: DeltaSpec) -> list[str]:
    prefix = f"deltas.{delta.name}."
    return sorted({name[len(prefix):].rpartition(".")[0] for name in source.reader.names() if name.startswith(prefix)})


def _plan(config: CompositionConfig, sources: list[Source]) -> Plan:
    first = sources[0].manifest.model
    layout: Layout = {}
    producers: dict[str, Any] = {}
    modalities: list[ModalitySpec] = []
    for source in sources:
        for modality in source.manifest.model.modalities:
            new = source.renames.get(modality.name, modality.name)
            placeholder = modality.placeholder if new == modality.name else f"<{new}>"
            modalities.append(modality.model_copy(update={"name": new, "placeholder": placeholder}))
            old_prefix, new_prefix = f"modalities.{modality.name}.", f"modalities.{new}."
            for tensor in source.reader.names():
                if tensor.startswith(old_prefix):
                    target = new_prefix + tensor[len(old_prefix):]
                    layout[target] = source.reader.layout[tensor]
                    producers[target] = (source, tensor)

    all_routes = ["text", *[m.name for m in modalities]]
    if config.method == "naive":
        for source in sources:
            own = {r for d in source.manifest.model.deltas for r in d.routes}
            mine = {"text", *[m.name for m in source.manifest.model.modalities]}
            if len(source.manifest.model.deltas) > 1 or (own and own != mine):
                raise CompositionError(
                    f"naive composition needs models with one delta serving all their tokens (`shared` or `full`); "
                    f"{source.directory} is {source.manifest.model.strategy!r}: use method damc")
        merged_name, merged_routes = "merged", all_routes
    else:
        merged_name, merged_routes = "language", ["text"]
    parts = [(s, d) for s in sources if (d := s.delta_for("text")) is not None]
    deltas: list[DeltaSpec] = []
    merged_paths: list[str] = []
    if parts:
        merged = _merged_delta(config, parts, merged_name, merged_routes)
        origin = {"merge": config.merge, "inputs": [s.name for s, _ in parts], "ranks": [d.rank for _, d in parts]}
        merged = merged.model_copy(update={"source": origin})
        deltas.append(merged)
        merged_paths = _module_paths(*parts[0])
        for source, delta in parts[1:]:
            if _module_paths(source, delta) != merged_paths:
                raise CompositionError(f"{source.directory}: its deltas cover other layers than "
                                       f"{parts[0][0].directory}'s")
        for path in merged_paths:
            _plan_merged_tensors(config, parts, merged, path, layout, producers)
    if config.method == "damc":
        for source in sources:
            grouped: dict[str, tuple[DeltaSpec, list[str]]] = {}  # one delta may serve several of its modalities
            for modality in source.manifest.model.modalities:
                delta = source.delta_for(modality.name)
                if delta is not None:
                    grouped.setdefault(delta.name, (delta, []))[1].append(source.renames.get(modality.name,
                                                                                             modality.name))
            for delta, routes in grouped.values():
                new = routes[0]
                deltas.append(delta.model_copy(update={"name": new, "routes": routes,
                                                       "source": {"model": source.name, "delta": delta.name}}))
                prefix = f"deltas.{delta.name}."
                for tensor in source.reader.names():
                    if tensor.startswith(prefix):
                        target = f"deltas.{new}." + tensor[len(prefix):]
                        layout[target] = source.reader.layout[tensor]
                        producers[target] = (source, tensor)
    spec = ModelSpec(modalities=modalities, deltas=deltas, target_modules=first.target_modules,
                     template=first.template, chat_template=first.chat_template, strategy="composed")
    return Plan(spec, layout, producers, merged_paths)


def _plan_merged_tensors(config: CompositionConfig, parts: list[tuple[Source, DeltaSpec]], merged: DeltaSpec,
                         path: str, layout: Layout, producers: dict[str, Any]) -> None:
    source, delta = parts[0]
    dtypes = [s.reader.layout[_input_names(d, path)[0]][0] for s, d in parts]
    dtype = dtypes[0]
    for other in dtypes[1:]:
        dtype = torch.promote_types(dtype, other)
    if delta.kind == "lora":
        in_features = source.reader.layout[f"deltas.{delta.name}.{path}.lora_A"][1][1]
        out_features = source.reader.layout[f"deltas.{delta.name}.{path}.lora_B"][1][0]
    else:
        out_features, in_features = source.reader.layout[f"deltas.{delta.name}.{path}.weight"][1]
    key = f"deltas.{merged.name}.{path}"
    if merged.kind == "lora":
        layout[f"{key}.lora_A"] = (dtype, (merged.rank, in_features))
        layout[f"{key}.lora_B"] = (dtype, (out_features, merged.rank))
        producers[f"{key}.lora_A"] = ("merge", path, 0)
        producers[f"{key}.lora_B"] = ("merge", path, 1)
    else:
        layout[f"{key}.weight"] = (dtype, (out_features, in_features))
        producers[f"{key}.weight"] = ("merge", path, 0)


def _input_names(delta: DeltaSpec, path: str) -> list[str]:
    key = f"deltas.{delta.name}.{path}"
    return [f"{key}.lora_A", f"{key}.lora_B"] if delta.kind == "lora" else [f"{key}.weight"]


def _product(source: Source, delta: DeltaSpec, path: str) -> torch.Tensor:
    if delta.kind == "dense":
        return source.read(f"deltas.{delta.name}.{path}.weight")
    a, b = (source.read(name) for name in _input_names(delta, path))
    return lora_product(a.float(), b.float(), delta.alpha / delta.rank).to(a.dtype)


def _merge_module(config: CompositionConfig, parts: list[tuple[Source, DeltaSpec]], merged: DeltaSpec, path: str,
                  generator: torch.Generator) -> list[torch.Tensor]:
    """The merged delta's tensors for one module: [lora_A, lora_B] or [weight]."""
    lambdas = [s.weight for s, _ in parts]
    if config.merge == LEGACY_MERGE:
        factors = [[s.read(n) for n in _input_names(d, path)] for s, d in parts]
        return list(factorwise_mean([a for a, _ in factors], [b for _, b in factors], lambdas))
    if merged.kind == "lora":
        factors = [[s.read(n) for n in _input_names(d, path)] for s, d in parts]
        scales = [d.alpha / d.rank for _, d in parts]
        return list(lora_concat([a for a, _ in factors], [b for _, b in factors], scales, lambdas))
    params = config.method_parameters([s.density for s, _ in parts])
    products = [_product(s, d, path) for s, d in parts]
    return [METHODS[config.merge](products, lambdas, params, generator)]


def compose(config: CompositionConfig, out: str | Path, *, overwrite: bool = False, progress: bool = True) -> Path:
    """Compose the models of `config` into a new checkpoint at `out` (atomic: nothing is left on failure)."""
    sources: list[Source] = []
    try:
        for index, entry in enumerate(config.models):
            sources.append(open_source(entry, index))
    except BaseException:
        for source in sources:
            source.reader.close()
        raise
    return compose_sources(config, sources, out, overwrite=overwrite, progress=progress)


def compose_sources(config: CompositionConfig, sources: list[Source], out: str | Path, *, overwrite: bool = False,
                    progress: bool = True) -> Path:
    """Compose already opened sources (one per `config.models` entry, in order); closes them."""
    out = Path(out)
    try:
        _assign_roles(config, sources)
        _check_compatible(sources)
        plan = _plan(config, sources)
        base = resolve_base(sources[0].directory, sources[0].manifest)
        merged = next((d for d in plan.spec.deltas if d.name in ("merged", "language") and "text" in d.routes), None)
        parts = [(s, d) for s in sources if (d := s.delta_for("text")) is not None]
        generator = torch.Generator().manual_seed(config.seed)
        with atomic_directory(out, overwrite=overwrite) as temporary:
            pending: list[torch.Tensor] = []
            with SafetensorsStream(temporary / TENSOR_FILE, plan.layout) as stream, \
                    Progress(disable=not progress, transient=True) as bar:
                task = bar.add_task("composing", total=len(plan.layout))
                for name, (dtype, _) in plan.layout.items():
                    producer = plan.producers[name]
                    if producer[0] == "merge":
                        if producer[2] == 0:
                            pending = _merge_module(config, parts, merged, producer[1], generator)
                        tensor = pending[producer[2]]
                    else:
                        source, tensor_name = producer
                        tensor = source.read(tensor_name)
                    stream.write(name, tensor.to(dtype))
                    bar.advance(task)
            accounting = _account(sources, plan)
            fingerprint = sources[0].manifest.base.fingerprint
            reference = BaseReference(path=base_reference(str(base), out), fingerprint=fingerprint)
            manifest = Manifest(
                base=reference,
                model=plan.spec, files=[TENSOR_FILE],
                provenance={"composition": {
                    **config.model_dump(mode="json", by_alias=True, exclude={"models", "lambdas"}),
                    "models": [{"name": s.name, "lambda": s.weight, "density": s.density, **s.record}
                               for s in sources],
                    "accounting": accounting,
                }},
            )
            write_manifest(temporary, manifest)
    finally:
        for source in sources:
            source.reader.close()
    return out


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def _account(sources: list[Source], plan: Plan) -> dict[str, int]:
    """Every input tensor must have been used, and the output must hold what the inputs imply."""
    for source in sources:
        unused = set(source.reader.names()) - source.consumed
        if unused:
            raise CompositionError(f"{source.directory}: {len(unused)} tensor(s) would be silently dropped, "
                                   f"e.g. {sorted(unused)[0]}")
    branch_in = sum(_numel(s.reader.layout[n][1]) for s in sources for n in s.reader.names()
                    if n.startswith("modalities."))
    branch_out = sum(_numel(shape) for n, (_, shape) in plan.layout.items() if n.startswith("modalities."))
    if branch_in != branch_out:
        raise CheckpointError(f"composition accounted for {branch_out} branch parameters, inputs have {branch_in}")
    return {
        "input_tensors": sum(len(s.reader.layout) for s in sources),
        "output_tensors": len(plan.layout),
        "branch_parameters": branch_out,
        "delta_parameters": sum(_numel(shape) for n, (_, shape) in plan.layout.items() if n.startswith("deltas.")),
    }
