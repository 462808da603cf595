"""The multimodal LLM: modality branches (encoder -> connector, with boundary tokens) feeding a stock
transformers causal LM whose target linears are `RoutedLinear`s."""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Literal

import torch
from accelerate import dispatch_model, init_empty_weights
from accelerate.hooks import remove_hook_from_submodules
from accelerate.utils import find_tied_parameters, set_module_tensor_to_device
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from mmcompose.errors import CheckpointError, InputError, MMComposeError, preview
from mmcompose.files import atomic_directory
from mmcompose.modalities import build_connector, build_encoder, build_processor, get_modality
from mmcompose.model.assembly import Assembler, Batch, Example
from mmcompose.model.conversation import CHAT, Formatted, render_conversation, tokenizer_chat_template
from mmcompose.model.generation import choose, decode, prefill
from mmcompose.model.manifest import (
    TENSOR_FILE,
    BaseReference,
    Manifest,
    base_reference,
    read_manifest,
    resolve_base,
    write_checkpoint,
)
from mmcompose.model.placement import Placement, plan_placement, resolve_device, resolve_dtype
from mmcompose.model.quantize import check_quantize, quantization_config
from mmcompose.model.routed import TEXT_ROUTE, RouteContext, RoutedLinear, wrap_linears
from mmcompose.model.spec import Component, ModalitySpec, ModelSpec, Strategy, strategy_deltas
from mmcompose.tensorfiles import (
    TensorReader,
    check_tensor_set,
    checkpoint_files,
    fingerprint_base,
    safetensors_header,
    weight_files,
)


class ModalityBranch(nn.Module):
    """Encoder -> connector, wrapped in learnable boundary tokens: `(n, ...) -> (n, tokens, hidden)`.

    Fresh boundary tokens are zeros, as ModelCompose creates them (`torch.zeros`): they learn from zero in the
    run that adds them."""

    def __init__(self, spec: ModalitySpec, hidden_size: int) -> None:
        super().__init__()
        self.encoder = build_encoder(spec.encoder.type, spec.encoder.options)
        self.connector = build_connector(spec.connector.type, self.encoder.output_dim, hidden_size,
                                         **spec.connector.options)
        self.prefix = nn.Parameter(torch.empty(spec.num_prefix_tokens, hidden_size)) if spec.num_prefix_tokens \
            else None
        self.suffix = nn.Parameter(torch.empty(spec.num_suffix_tokens, hidden_size)) if spec.num_suffix_tokens \
            else None
        # initialised once registered: under a meta-device construction (`from_pretrained`) that is a no-op
        for tokens in (self.prefix, self.suffix):
            if tokens is not None:
                nn.init.zeros_(tokens)

    def forward(self, inputs: torch.Tensor, *, encoded: bool = False) -> torch.Tensor:
        """`encoded`: `inputs` are already the encoder's outputs (a feature cache of a frozen encoder)."""
        features = self.connector(inputs if encoded else self.encoder(inputs))
        parts = [features]
        if self.prefix is not None:
            parts.insert(0, self.prefix.to(features.dtype).expand(features.shape[0], -1, -1))
        if self.suffix is not None:
            parts.append(self.suffix.to(features.dtype).expand(features.shape[0], -1, -1))
        return torch.cat(parts, dim=1)


def modality_spec(name: str, *, encoder: Component | None = None, connector: Component | None = None,
                  processor: Component | None = None, num_prefix_tokens: int | None = None,
                  num_suffix_tokens: int | None = None) -> ModalitySpec:
    """A modality's spec from its registered defaults, with any part overridden."""
    default = get_modality(name)
    return ModalitySpec(
        name=name,
        placeholder=default.placeholder,
        processor=processor or Component(type=default.processor, options=default.processor_options),
        encoder=encoder or Component(type=default.encoder, options=default.encoder_options),
        connector=connector or Component(type=default.connector, options=default.connector_options),
        num_prefix_tokens=default.num_prefix_tokens if num_prefix_tokens is None else num_prefix_tokens,
        num_suffix_tokens=default.num_suffix_tokens if num_suffix_tokens is None else num_suffix_tokens,
    )


class MultimodalLLM(nn.Module):
    """A base LLM plus modality branches and routed deltas, as described by a `ModelSpec`.

    The base LLM is referenced by `base_path` (with its fingerprint) rather than copied into checkpoints.
    """

    def __init__(self, llm: PreTrainedModel, tokenizer: Any, spec: ModelSpec, base_path: str | Path,
                 base_fingerprint: str, *, empty: bool = False) -> None:
        """`empty`: the branches' and deltas' parameters are created on the meta device, in the LLM's dtype,
        for a loader to fill in place (nothing is allocated or randomly initialised); else they are new and
        randomly initialised as for training: the deltas beside their base weights, the branches on the CPU in
        float32."""
        super().__init__()
        self.llm, self.tokenizer, self.spec = llm, tokenizer, spec
        self.base_path, self.base_fingerprint = str(base_path), base_fingerprint
        self.provenance: dict[str, Any] = {}
        self.execution_device: torch.device | None = None
        hidden = llm.config.hidden_size
        with init_empty_weights(include_buffers=False) if empty else nullcontext():
            self.branches = nn.ModuleDict({m.name: ModalityBranch(m, hidden) for m in spec.modalities})
        if empty:
            self.branches.to(llm.dtype)
        self.processors = {m.name: build_processor(m.processor.type, m.processor.options) for m in spec.modalities}
        route_ids = spec.route_ids()
        self.routing = RouteContext({route_ids[r]: d.name for d in spec.deltas for r in d.routes})
        self.routed: dict[str, RoutedLinear] = wrap_linears(llm, tuple(spec.target_modules), self.routing,
                                                            compute_dtype=llm.dtype) if spec.deltas else {}
        for delta in spec.deltas:
            for layer in self.routed.values():
                layer.add_delta(delta.name, delta.kind, delta.rank, delta.alpha, device="meta" if empty else None)
        self.assembler = Assembler(tokenizer, {m.name: m.placeholder for m in spec.modalities}, route_ids,
                                   max_length=getattr(llm.config, "max_position_embeddings", 2048))

    @classmethod
    def from_base(cls, base_path: str | Path, modalities: Sequence[str | ModalitySpec], *,
                  strategy: Strategy = "connector-only", rank: int = 16, alpha: float = 32.0,
                  target_modules: Sequence[str] | None = None, template: str = "tagged",
                  chat_template: str | None = None, device: str | torch.device | None = None,
                  dtype: str | torch.dtype | None = None, quantize: str | None = None) -> MultimodalLLM:
        """A new (untrained) modality model on a base LLM saved in `base_path`, on `device` (None: the CPU; `auto`:
        the first GPU if any) in `dtype` (`auto`: see `mmcompose.model.placement.resolve_dtype`; None: the stored
        dtype for the LLM and float32 for the branches).

        Template `chat` records `chat_template` (a start checkpoint's) or else the base tokenizer's own.
        `quantize` ("8bit" | "4bit"): the base's linears quantized with bitsandbytes, as in `load_base`; the
        branches and deltas then take the 16-bit compute dtype (`dtype`, else bfloat16)."""
        specs = [m if isinstance(m, ModalitySpec) else modality_spec(m) for m in modalities]
        target = resolve_device(device)
        if quantize is not None:
            dtype = _quantized_dtype(quantize, dtype, target, base_path)
        llm, tokenizer = load_base(base_path, resolve_dtype(dtype, target, base_path), device_map=target,
                                   quantize=quantize)
        if template == CHAT and chat_template is None:
            chat_template = tokenizer_chat_template(tokenizer, f"the tokenizer of {base_path}")
        options: dict[str, Any] = {"template": template, "strategy": strategy,
                                   "chat_template": chat_template if template == CHAT else None,
                                   "deltas": strategy_deltas(strategy, [m.name for m in specs], rank, alpha)}
        if target_modules is not None:
            options["target_modules"] = list(target_modules)
        spec = ModelSpec(modalities=specs, **options)
        model = cls(llm, tokenizer, spec, base_path, fingerprint_base(base_path))
        # the branches follow an asked-for precision; without one they stay float32, as training wants them
        model.branches.to(target, llm.dtype if dtype is not None else None)
        return model

    @property
    def device(self) -> torch.device:
        """Where inputs go: the execution device of a dispatched model (whose embeddings may be offloaded),
        else the device of the input embeddings."""
        return self.execution_device or self.llm.get_input_embeddings().weight.device

    def _dtype_of(self, modality: str) -> torch.dtype:
        """Inputs follow their branch's dtype, so a bf16 model takes the processors' float32 tensors."""
        return next(self.branches[modality].parameters()).dtype

    # --- inputs -------------------------------------------------------------------------------------
    @torch.no_grad()
    def input_length(self, modality: str, processed: torch.Tensor) -> int:
        """How many LLM positions one processed input of `modality` takes, boundary tokens included."""
        return self.encode(modality, processed.unsqueeze(0)).shape[1]

    def encode(self, modality: str, inputs: torch.Tensor, *, encoded: bool = False) -> torch.Tensor:
        """Stacked processed inputs `(n, ...)` of `modality` -> their LLM positions `(n, tokens, hidden)`, on the
        model's device; with `encoded`, the inputs are encoder outputs (a feature cache)."""
        return self.branches[modality](inputs.to(self.device, self._dtype_of(modality)), encoded=encoded)

    def example(self, prompt: str, inputs: dict[str, Sequence[Any]] | None = None, target: str | None = None,
                id: str = "") -> Example:
        """Process raw inputs (paths or arrays) with each modality's processor into an `Example`."""
        return Example(prompt=prompt, inputs=process_inputs(self.processors, inputs, id), target=target, id=id)

    def render_conversation(self, turns: list[dict[str, str]]) -> Formatted:
        """`turns` in this model's template, every answer marked: the one place training and inference format."""
        return render_conversation(turns, self.spec.template, self.tokenizer, self.spec.chat_template,
                                   [spec.placeholder for spec in self.spec.modalities])

    def format_conversation(self, turns: list[dict[str, str]]) -> tuple[str, str | None]:
        """`turns` as (prompt, last answer) in this model's template."""
        rendered = self.render_conversation(turns)
        return rendered.prompt, rendered.target

    def conversation_example(self, turns: list[dict[str, str]], inputs: dict[str, Sequence[Any]] | None = None,
                             id: str = "") -> Example:
        rendered = self.render_conversation(turns)
        example = self.example(rendered.prompt, inputs, rendered.target, id)
        example.answers, example.eos = rendered.answers, rendered.eos
        return example

    def assemble(self, examples: list[Example], padding_side: Literal["left", "right"] = "right",
                 encoded: Collection[str] = ()) -> Batch:
        """One padded batch; the inputs of the modalities in `encoded` are encoder outputs, not processed media."""
        embed = self.llm.get_input_embeddings()
        return self.assembler(
            examples,
            encode=lambda modality, x: self.encode(modality, x, encoded=modality in encoded),
            embed_tokens=lambda ids: embed(ids.to(self.device)),
            padding_side=padding_side,
        )

    # --- forward and generation ----------------------------------------------------------------------
    def forward(self, batch: Batch, **kwargs: Any) -> Any:
        with self.routing.route(batch.routes):
            return self.llm(inputs_embeds=batch.embeds, attention_mask=batch.attention_mask,
                            position_ids=batch.position_ids, labels=batch.labels, **kwargs)

    @torch.no_grad()
    def generate(self, examples: list[Example], max_new_tokens: int = 32, *, temperature: float = 0.0,
                 use_cache: bool = True, generator: torch.Generator | None = None,
                 on_token: Callable[[int, int], None] | None = None) -> list[str]:
        """Greedy (temperature 0) or sampled decoding; every generated token takes the text route.

        With the cache (`mmcompose.model.generation`), the prompt is prefilled once, each step feeds one token
        and rows that reached EOS leave the batch; without it, every step recomputes the whole sequence (the
        reference the cached path must equal). `on_token(row, token_id)` streams tokens as they are chosen.
        """
        if not use_cache:
            return self._generate_uncached(examples, max_new_tokens, temperature, generator, on_token)
        if max_new_tokens <= 0:
            return ["" for _ in examples]
        state, logits = prefill(self, self.assemble(examples, padding_side="left"))
        tokens = decode(self, state, logits, max_new_tokens, temperature=temperature, generator=generator,
                        on_token=on_token)
        return [self.answer_text(row) for row in tokens]

    def answer_text(self, tokens: list[int]) -> str:
        """Generated tokens as text: up to the first EOS, special tokens skipped."""
        return self.tokenizer.decode(_until_eos(tokens, self.tokenizer.eos_token_id), skip_special_tokens=True)

    def _generate_uncached(self, examples: list[Example], max_new_tokens: int, temperature: float,
                           generator: torch.Generator | None,
                           on_token: Callable[[int, int], None] | None) -> list[str]:
        """The whole sequence recomputed every step: slow, simple, and the reference for the cached path."""
        batch = self.assemble(examples, padding_side="left")
        embed = self.llm.get_input_embeddings()
        eos = self.tokenizer.eos_token_id
        embeds, mask, positions, routes = batch.embeds, batch.attention_mask, batch.position_ids, batch.routes
        finished = torch.zeros(len(examples), dtype=torch.bool, device=self.device)
        tokens: list[list[int]] = [[] for _ in examples]
        for _ in range(max_new_tokens):
            with self.routing.route(routes):
                out = self.llm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=False,
                               logits_to_keep=1)
            token = choose(out.logits[:, -1].float(), temperature, generator=generator)
            for row in (~finished).nonzero().flatten().tolist():
                tokens[row].append(int(token[row]))
                if on_token is not None:
                    on_token(row, int(token[row]))
            if eos is not None:
                finished |= token == eos
            if bool(finished.all()):
                break
            embeds = torch.cat([embeds, embed(token).unsqueeze(1)], dim=1)
            positions = torch.cat([positions, positions[:, -1:] + 1], dim=1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            routes = torch.cat([routes, torch.full_like(routes[:, :1], TEXT_ROUTE)], dim=1)
        return [self.tokenizer.decode(_until_eos(row, eos), skip_special_tokens=True) for row in tokens]

    # --- text-route folding --------------------------------------------------------------------------
    @property
    def quantized(self) -> bool:
        """Whether routed layers sit over quantized (packed) base weights, which nothing can be folded into."""
        return any(layer.packed for layer in self.routed.values())

    def fold_text_route(self) -> None:
        """Fold the text route's delta into the base weights (`W += D_text`, in place, layer by layer): generated
        tokens then cost what the base LLM costs, and each modality route applies `D_m` and `-D_text` to its own
        tokens from the factors the model already holds. No copy of `W` is kept and nothing is derived: the fold
        needs no memory beyond `W` itself. `unfold_text_route` reads the original weights back from the base
        LLM's safetensors, which are checked here first (every target weight there, with its shape), so that no
        fold is done that could not be undone.

        A model with offloaded layers (weights on the disk, or on the CPU for a GPU model) is left unfolded: its
        hooks reload those weights from their files at every forward, so nothing added into them would last; the
        text delta is then applied unfused, which is exact and costs its low-rank product per token. So is a model
        over a quantized base (`quantize`): nothing can be added into packed weights."""
        if self.routing.folded or self.quantized or \
                any(layer.base.weight.device.type == "meta" for layer in self.routed.values()):
            return
        text = self.routing.route_to_delta.get(TEXT_ROUTE)
        if text is not None:
            for path, layer in self.routed.items():
                refusal = layer.fold_refusal()
                if refusal is not None:
                    raise MMComposeError(f"cannot fold the text route's delta into {path}: {refusal}")
            with TensorReader(weight_files(Path(self.base_path))) as reader:
                self._stored_weight_names(reader)
            for layer in self.routed.values():
                layer.fold(text)
        self.routing.folded = True

    def unfold_text_route(self) -> None:
        """Undo `fold_text_route`: every folded `W` is read back from the base LLM's safetensors (memory-mapped,
        one tensor at a time) and cast as loading cast it, so the weights are bit for bit those of a fresh load
        in the model's dtype. The base's fingerprint must still be the one the model was loaded with."""
        if not self.routing.folded:
            return
        if self.routing.route_to_delta.get(TEXT_ROUTE) is not None:
            if fingerprint_base(self.base_path) != self.base_fingerprint:
                raise CheckpointError(f"{self.base_path}: the base LLM's weights changed on disk since the model was "
                                      f"loaded, so the folded weights cannot be restored from them")
            with TensorReader(weight_files(Path(self.base_path))) as reader:
                for path, name in self._stored_weight_names(reader).items():
                    self.routed[path].unfold(reader.get(name))
        self.routing.folded = False

    def _stored_weight_names(self, reader: TensorReader) -> dict[str, str]:
        """The base LLM's tensor name of each routed layer's weight (its path plus `.weight`, as transformers saves
        it), each checked against the layer's shape."""
        names = {}
        for path, layer in self.routed.items():
            name = f"{path}.weight"
            if name not in reader:
                raise CheckpointError(f"{self.base_path}: no tensor {name} in the base LLM's safetensors, so the "
                                      f"weight of {path} could not be restored after folding")
            shape = tuple(layer.base.weight.shape)
            if reader.layout[name][1] != shape:
                raise CheckpointError(f"{self.base_path}: tensor {name} has shape {reader.layout[name][1]}, "
                                      f"the model's weight {shape}")
            names[path] = name
        return names

    # --- tensors a checkpoint stores ------------------------------------------------------------------
    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        """Everything that is not the base LLM: modality branches and deltas, under stable names."""
        if self.routing.folded:
            raise MMComposeError("unfold the text route before saving (fold is a runtime optimisation)")
        tensors = {f"modalities.{name}.{key}": value
                   for name, branch in self.branches.items() for key, value in branch.state_dict().items()}
        for path, layer in self.routed.items():
            for delta_name, delta in layer.deltas.items():
                for key, value in delta.state_dict().items():
                    tensors[f"deltas.{delta_name}.{path}.{key}"] = value
        return tensors

    def load_checkpoint_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy tensors in, strictly: every expected name present, nothing unexpected, shapes and dtypes equal."""
        expected = self.checkpoint_tensors()
        check_tensor_set(expected, tensors)
        with torch.no_grad():
            for name, target in expected.items():
                target.copy_(tensors[name])

    # --- checkpoints ------------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path, *, overwrite: bool = False) -> Path:
        """Write a checkpoint: `manifest.json` (the base LLM by reference and fingerprint, not copied) and
        `model.safetensors` with `checkpoint_tensors()`, atomically (nothing is left on failure).

        Unlike transformers' `save_pretrained`, an existing `directory` is refused unless `overwrite`.
        """
        directory = Path(directory)
        manifest = Manifest(
            base=BaseReference(path=base_reference(self.base_path, directory), fingerprint=self.base_fingerprint),
            model=self.spec, files=[TENSOR_FILE], provenance=self.provenance,
        )
        tensors = self.checkpoint_tensors()
        with atomic_directory(directory, overwrite=overwrite) as temporary:
            write_checkpoint(temporary, manifest, tensors)
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, *, base: str | Path | None = None,
                        device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
                        device_map: str | dict[str, Any] | None = None, max_memory: str | dict[Any, Any] | None = None,
                        offload_folder: str | Path | None = None, quantize: str | None = None) -> MultimodalLLM:
        """Rebuild a saved model: its base LLM (from `base`, else where the manifest points; its fingerprint must
        match), then its own tensors, strictly. Local files only.

        `device` (None: the CPU; `auto`: the first GPU if any; `cuda:1`, ...) and `dtype` (None or `auto`: the
        base's stored dtype, bfloat16 for a float16 base on the CPU; or `bfloat16`, `float16`, `float32`) as in
        `mmcompose.model.placement`; branches and deltas follow the LLM's dtype. `device_map` (`auto`, `balanced`,
        `sequential` or a dict of module path to device), `max_memory` and `offload_folder` are accelerate's
        big-model inference over the composed model: layers on several GPUs, the CPU or the disk.

        Memory: the model is first built on the meta device and every tensor the checkpoint declares is checked
        against it (name, shape, kind of dtype) from the safetensors headers, before anything is allocated. The base
        is then loaded by transformers' `from_pretrained` (in place, in `dtype`, on its devices), and the
        checkpoint's tensors one by one, each cast and put on its device (`set_module_tensor_to_device`): no
        random initialisation of what the checkpoint overwrites, no second copy of the checkpoint. Tensors placed
        on the disk are not loaded at all: accelerate's hooks read them from their safetensors files (the base's
        and this checkpoint's) at each forward.
        """
        directory = Path(directory)
        manifest = read_manifest(directory)
        base_path = Path(base) if base is not None else resolve_base(directory, manifest)
        if not base_path.is_dir():
            raise CheckpointError(f"{directory}: base LLM not found at {base_path} (pass --base to point at it)")
        fingerprint = fingerprint_base(base_path)
        if fingerprint != manifest.base.fingerprint:
            raise CheckpointError(f"{directory}: the base LLM at {base_path} is not the one this checkpoint was "
                                  f"built on (fingerprint {fingerprint[:19]}..., expected "
                                  f"{manifest.base.fingerprint[:19]}...)")
        if quantize is not None:
            if device_map is not None:
                raise MMComposeError(f"--quantize {quantize} with --device-map: not supported (device maps are planned "
                                     f"on 16-bit sizes, and bitsandbytes layers cannot be offloaded); use --device")
            dtype = _quantized_dtype(quantize, dtype, resolve_device(device), base_path)
        else:
            dtype = resolve_dtype(dtype, resolve_device(device if device_map is None else "auto"), base_path)
        skeleton = cls.skeleton(base_path, manifest.model, dtype)
        with TensorReader(checkpoint_files(directory, manifest.files)) as reader:
            check_layout(skeleton.checkpoint_tensors(), reader, manifest.model)
            placement = plan_placement(skeleton, device=device, dtype=dtype,
                                       device_map=device_map, max_memory=max_memory, offload_folder=offload_folder,
                                       no_split=skeleton.no_split_modules())
            del skeleton
            with _without_offload_notice():
                llm, tokenizer = load_base(base_path, dtype, device_map=placement.submap("llm") or placement.device,
                                           offload_folder=placement.offload_folder, quantize=quantize)
            remove_hook_from_submodules(llm)  # hooks of transformers' dispatch name the unwrapped linears
            model = cls(llm, tokenizer, manifest.model, base_path, fingerprint, empty=True)
            model.provenance = dict(manifest.provenance)
            model._load_in_place(reader, placement)
        return model

    @classmethod
    def skeleton(cls, base_path: str | Path, spec: ModelSpec, dtype: torch.dtype) -> MultimodalLLM:
        """The model `spec` describes on the base at `base_path`, entirely on the meta device (buffers too): its
        shapes, dtypes and sizes for checks and device maps, for no memory."""
        config = AutoConfig.from_pretrained(base_path, local_files_only=True)
        with init_empty_weights(include_buffers=True):
            llm = AutoModelForCausalLM.from_config(config, dtype=dtype)
            return cls(llm, None, spec, base_path, "", empty=True)

    def no_split_modules(self) -> list[str]:
        """Module classes a device map keeps whole: the LLM's decoder layers (so a routed linear's deltas sit
        and are materialised with its base weight) and the modality branches."""
        return [*(getattr(self.llm, "_no_split_modules", None) or []), ModalityBranch.__name__]

    def _checkpoint_paths(self) -> dict[str, str]:
        """Checkpoint tensor name -> the tensor's path in this module."""
        paths = {f"modalities.{name}.{key}": f"branches.{name}.{key}"
                 for name, branch in self.branches.items() for key in branch.state_dict()}
        for path, layer in self.routed.items():
            for delta_name, delta in layer.deltas.items():
                for key in delta.state_dict():
                    paths[f"deltas.{delta_name}.{path}.{key}"] = f"llm.{path}.deltas.{delta_name}.{key}"
        return paths

    def _load_in_place(self, reader: TensorReader, placement: Placement) -> None:
        """Put every checkpoint tensor on its device in the model's dtype, one at a time, then dispatch: accelerate's
        hooks for a model over several devices or with weights on the disk (those are indexed, not read)."""
        index: dict[str, dict[str, str]] = {}
        expected = self.checkpoint_tensors()
        for name, path in self._checkpoint_paths().items():
            place = placement.device_of(path)
            target = expected[name]
            if place == "disk":
                index[path] = {"safetensors_file": str(reader.file_of[name]), "weight_name": name,
                               "dtype": str(target.dtype).removeprefix("torch.")}
            else:
                set_module_tensor_to_device(self, path, place, value=reader.get(name), dtype=target.dtype)
        for path, _ in self.branches.named_buffers():  # non-persistent ones were built on the CPU
            place = placement.device_of(f"branches.{path}")
            if place != "disk":  # accelerate's hooks move a disk branch's buffers to its execution device
                set_module_tensor_to_device(self.branches, path, place)
        if placement.device_map is None or (len(set(placement.device_map.values())) == 1
                                            and "disk" not in placement.device_map.values()):
            return
        index.update(self._base_offload_index(placement))
        main = placement.device.index if placement.device.type == "cuda" else placement.device.type  # safe_open's form
        # Offloaded modules get their weights per decoder layer and per branch, never per leaf module: accelerate's
        # default hooks the leaves that own weights, but `RoutedLinear` reads its base's weight directly (one
        # module call per linear when folded) and torch's attention layers read their `out_proj`'s.
        dispatch_model(self, placement.device_map, main_device=main, offload_dir=placement.offload_folder,
                       offload_index=index or None, preload_module_classes=placement.no_split)
        self.execution_device = placement.device

    def _base_offload_index(self, placement: Placement) -> dict[str, dict[str, str]]:
        """Where each base weight placed on the disk is stored: its own safetensors file, read at each forward."""
        stored: dict[str, str] = {}
        for file in weight_files(Path(self.base_path)):
            header, _ = safetensors_header(file)
            stored.update(dict.fromkeys(header, str(file)))
        tied: dict[str, str] = {}  # a tied weight is stored once, under one of its names
        for group in find_tied_parameters(self.llm):
            kept = next((name for name in group if _unwrapped_name(name, self.routed) in stored), group[0])
            tied.update(dict.fromkeys(group, kept))
        index: dict[str, dict[str, str]] = {}
        for name, tensor in self.llm.named_parameters(remove_duplicate=False):
            if placement.device_of(f"llm.{name}") != "disk" or ".deltas." in name:
                continue
            source = _unwrapped_name(tied.get(name, name), self.routed)
            if source not in stored:
                raise CheckpointError(f"{self.base_path}: weight {source} is not stored under that name, so it cannot "
                                      f"be read from the disk in place (map its layer to a device instead)")
            index[f"llm.{name}"] = {"safetensors_file": stored[source], "weight_name": source,
                                    "dtype": str(tensor.dtype).removeprefix("torch.")}
        return index


def process_inputs(processors: dict[str, Any], inputs: dict[str, Sequence[Any]] | None,
                   id: str = "") -> dict[str, list[torch.Tensor]]:
    """Raw inputs (paths or arrays) -> each modality's processed tensors. It needs only the processors, so it
    can run where the model is not (a DataLoader worker decoding the media of the next batches)."""
    processed: dict[str, list[torch.Tensor]] = {}
    for modality, sources in (inputs or {}).items():
        if modality not in processors:
            raise InputError(f"{id or 'sample'}: input of modality {modality!r}, which this model does not have "
                             f"(it has: {', '.join(processors) or 'none'})")
        processed[modality] = [processors[modality](source) for source in sources]
    return processed


def _until_eos(tokens: list[int], eos: int | None) -> list[int]:
    return tokens[: tokens.index(eos)] if eos is not None and eos in tokens else tokens


def check_layout(expected: dict[str, torch.Tensor], reader: TensorReader, spec: ModelSpec) -> None:
    """The checkpoint's tensors, as its safetensors headers declare them, against the model its manifest builds
    (on the meta device): the same names, the same shapes, floating where floating (a float tensor is cast to the
    model's dtype on load). Nothing is read or allocated, so a manifest that disagrees with its file (a delta rank
    of 2e8) is one line naming the file and the manifest field, not a huge allocation."""
    found = reader.layout
    missing, unexpected = expected.keys() - found.keys(), found.keys() - expected.keys()
    files = ", ".join(sorted({str(file) for file in reader.file_of.values()}))
    if missing:
        raise CheckpointError(f"{files}: {len(missing)} missing tensor(s): {preview(missing)}")
    if unexpected:
        raise CheckpointError(f"{files}: {len(unexpected)} unexpected tensor(s): {preview(unexpected)}")
    for name, target in expected.items():
        dtype, shape = found[name]
        if shape != tuple(target.shape):
            raise CheckpointError(f"{reader.file_of[name]}: tensor {name} has shape {shape}, but the manifest's "
                                  f"{_manifest_field(spec, name)} makes it {tuple(target.shape)}")
        if dtype != target.dtype and not (dtype.is_floating_point and target.dtype.is_floating_point):
            raise CheckpointError(f"{reader.file_of[name]}: tensor {name} has dtype {dtype}, expected "
                                  f"{target.dtype}")


def _manifest_field(spec: ModelSpec, name: str) -> str:
    """The manifest field that decides the shape of checkpoint tensor `name`."""
    kind, owner, rest = name.split(".", 2)
    if kind == "deltas":
        index = next(i for i, delta in enumerate(spec.deltas) if delta.name == owner)
        delta = spec.deltas[index]
        return f"model.deltas[{index}] ({owner}, kind {delta.kind}, rank {delta.rank})"
    index = next(i for i, modality in enumerate(spec.modalities) if modality.name == owner)
    modality = spec.modalities[index]
    where = f"model.modalities[{index}] ({owner})"
    if rest in ("prefix", "suffix"):
        count = modality.num_prefix_tokens if rest == "prefix" else modality.num_suffix_tokens
        return f"{where}.num_{rest}_tokens {count}"
    part = rest.split(".")[0]
    return f"{where}.{part} ({getattr(modality, part).type})" if part in ("encoder", "connector") else where


def _unwrapped_name(name: str, routed: dict[str, RoutedLinear]) -> str:
    """A parameter's name in the base LLM's own files: `X.q_proj.base.weight` is stored as `X.q_proj.weight`."""
    module, _, leaf = name.rpartition(".")
    owner = module.removesuffix(".base")
    return f"{owner}.{leaf}" if module.endswith(".base") and owner in routed else name


def _quantized_dtype(quantize: str, dtype: str | torch.dtype | None, device: torch.device,
                     base_path: str | Path) -> torch.dtype:
    """The compute dtype of a quantized base on `device`: bfloat16 for None or `auto` (whatever the stored dtype),
    else `dtype` checked as `--dtype` is; `check_quantize` refuses float32 and a bitsandbytes that cannot run
    `quantize` there, before anything is loaded."""
    explicit = None if dtype is None or dtype == "auto" else resolve_dtype(dtype, device, base_path)
    return check_quantize(quantize, explicit, device)


def load_base(base_path: str | Path, dtype: torch.dtype | str | None = None, *,
              device_map: torch.device | dict[str, Any] | None = None,
              offload_folder: str | Path | None = None, quantize: str | None = None) -> tuple[PreTrainedModel, Any]:
    """Load a local base LLM and its tokenizer (never from a hub), frozen: transformers' `from_pretrained`, which
    builds on the meta device and loads each weight in place, in `dtype` (None: the stored one), on `device_map`
    (a device, or accelerate's map of the LLM's modules). `quantize` ("8bit" | "4bit"): its linears quantized by
    bitsandbytes as transformers loads them (the LM head and embeddings stay in `dtype`), placed on the device
    as they are quantized (a bitsandbytes model cannot be moved after)."""
    path = Path(base_path)
    if not (path / "config.json").is_file():
        raise MMComposeError(f"{path}: not a base LLM directory (no config.json)")
    options: dict[str, Any] = {}
    if quantize is not None:
        device = device_map if isinstance(device_map, torch.device) else torch.device("cpu")
        dtype = check_quantize(quantize, dtype, device)
        options["quantization_config"] = quantization_config(quantize, dtype)
        device_map = device_map if isinstance(device_map, dict) else {"": device}
    elif isinstance(device_map, torch.device):
        device_map = None if device_map.type == "cpu" else {"": device_map}
    llm = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype, device_map=device_map,
                                               offload_folder=offload_folder, **options)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    llm.requires_grad_(False)
    llm.eval()
    llm.get_output_embeddings().register_forward_pre_hook(_restride_last_positions)
    return llm, tokenizer


@contextmanager
def _without_offload_notice() -> Iterator[None]:
    """Drop accelerate's "Some parameters are on the meta device because they were offloaded" warning while
    transformers dispatches the base LLM alone: the dispatch of the whole model logs it again a moment later."""
    logger = logging.getLogger("accelerate.big_modeling")

    def keep(record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Some parameters are on the meta device")

    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


def _restride_last_positions(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    """Give the LM head a fresh copy of its input when that is a slice with a stretched stride.

    transformers computes only the last position's logits by slicing the hidden states (`logits_to_keep=1`:
    `(rows, 1, hidden)` with the stride of the whole sequence). On torch 2.13's CPU, `F.linear` of such a slice in
    bfloat16 against a weight that does not require grad (a frozen base) copies the whole weight before its matmul:
    measured at vicuna-7b's LM head (32000 x 4096), 1.3-2.2 s of CPU per call against 0.03 s for the same rows with
    ordinary strides, once per prefill. Copying the slice costs `rows x hidden` elements."""
    hidden = args[0]
    if not isinstance(hidden, torch.Tensor) or hidden.stride() == torch.empty(hidden.shape, device="meta").stride():
        return None
    return (hidden.clone(memory_format=torch.contiguous_format), *args[1:])
