"""The multimodal LLM: modality branches (encoder -> connector, with boundary tokens) feeding a stock
transformers causal LM whose target linears are `RoutedLinear`s."""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from mmcompose.errors import CheckpointError, InputError, MMComposeError
from mmcompose.files import atomic_directory
from mmcompose.modalities import build_connector, build_encoder, build_processor, get_modality
from mmcompose.model.assembly import Assembler, Batch, Example
from mmcompose.model.conversation import CHAT, format_conversation, tokenizer_chat_template
from mmcompose.model.generation import choose, prefill, step
from mmcompose.model.manifest import (
    TENSOR_FILE,
    BaseReference,
    Manifest,
    base_reference,
    read_manifest,
    resolve_base,
    write_checkpoint,
)
from mmcompose.model.quantize import check_quantize, quantization_config
from mmcompose.model.routed import TEXT_ROUTE, RouteContext, RoutedLinear, wrap_linears
from mmcompose.model.spec import Component, ModalitySpec, ModelSpec, Strategy, strategy_deltas
from mmcompose.tensorfiles import check_tensor_set, checkpoint_files, fingerprint_base, read_tensors


class ModalityBranch(nn.Module):
    """Encoder -> connector, wrapped in learnable boundary tokens: `(n, ...) -> (n, tokens, hidden)`."""

    def __init__(self, spec: ModalitySpec, hidden_size: int) -> None:
        super().__init__()
        self.encoder = build_encoder(spec.encoder.type, spec.encoder.options)
        self.connector = build_connector(spec.connector.type, self.encoder.output_dim, hidden_size,
                                         **spec.connector.options)
        self.prefix = nn.Parameter(torch.randn(spec.num_prefix_tokens, hidden_size) * 0.02) \
            if spec.num_prefix_tokens else None
        self.suffix = nn.Parameter(torch.randn(spec.num_suffix_tokens, hidden_size) * 0.02) \
            if spec.num_suffix_tokens else None

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
                 base_fingerprint: str) -> None:
        super().__init__()
        self.llm, self.tokenizer, self.spec = llm, tokenizer, spec
        self.base_path, self.base_fingerprint = str(base_path), base_fingerprint
        self.provenance: dict[str, Any] = {}
        hidden = llm.config.hidden_size
        self.branches = nn.ModuleDict({m.name: ModalityBranch(m, hidden) for m in spec.modalities})
        self.processors = {m.name: build_processor(m.processor.type, m.processor.options) for m in spec.modalities}
        route_ids = spec.route_ids()
        self.routing = RouteContext({route_ids[r]: d.name for d in spec.deltas for r in d.routes})
        self.routed: dict[str, RoutedLinear] = wrap_linears(llm, tuple(spec.target_modules), self.routing,
                                                            compute_dtype=llm.dtype) if spec.deltas else {}
        for delta in spec.deltas:
            for layer in self.routed.values():
                layer.add_delta(delta.name, delta.kind, delta.rank, delta.alpha)
        self.assembler = Assembler(tokenizer, {m.name: m.placeholder for m in spec.modalities}, route_ids,
                                   max_length=getattr(llm.config, "max_position_embeddings", 2048))

    @classmethod
    def from_base(cls, base_path: str | Path, modalities: Sequence[str | ModalitySpec], *,
                  strategy: Strategy = "connector-only", rank: int = 16, alpha: float = 32.0,
                  target_modules: Sequence[str] | None = None, template: str = "plain",
                  chat_template: str | None = None, dtype: torch.dtype | None = None,
                  quantize: str | None = None) -> MultimodalLLM:
        """A new (untrained) modality model on a base LLM saved in `base_path`.

        Template `chat` records `chat_template` (a start checkpoint's) or else the base tokenizer's own.
        `quantize` ("8bit" | "4bit"): the base's linears quantized with bitsandbytes, as in `load_base`."""
        specs = [m if isinstance(m, ModalitySpec) else modality_spec(m) for m in modalities]
        llm, tokenizer = load_base(base_path, dtype, quantize=quantize)
        if template == CHAT and chat_template is None:
            chat_template = tokenizer_chat_template(tokenizer, f"the tokenizer of {base_path}")
        options: dict[str, Any] = {"template": template, "strategy": strategy,
                                   "chat_template": chat_template if template == CHAT else None,
                                   "deltas": strategy_deltas(strategy, [m.name for m in specs], rank, alpha)}
        if target_modules is not None:
            options["target_modules"] = list(target_modules)
        spec = ModelSpec(modalities=specs, **options)
        return cls(llm, tokenizer, spec, base_path, fingerprint_base(base_path))

    @property
    def device(self) -> torch.device:
        return self.llm.get_input_embeddings().weight.device

    def _dtype_of(self, modality: str) -> torch.dtype:
        """Inputs follow their branch's dtype, so a bf16 model takes the processors' float32 tensors."""
        return next(self.branches[modality].parameters()).dtype

    # --- inputs -------------------------------------------------------------------------------------
    @torch.no_grad()
    def input_length(self, modality: str, processed: torch.Tensor) -> int:
        """How many LLM positions one processed input of `modality` takes, boundary tokens included."""
        return self.branches[modality](processed.unsqueeze(0).to(self.device, self._dtype_of(modality))).shape[1]

    def example(self, prompt: str, inputs: dict[str, Sequence[Any]] | None = None, target: str | None = None,
                id: str = "") -> Example:
        """Process raw inputs (paths or arrays) with each modality's processor into an `Example`."""
        processed: dict[str, list[torch.Tensor]] = {}
        for modality, sources in (inputs or {}).items():
            if modality not in self.processors:
                raise InputError(f"{id or 'sample'}: input of modality {modality!r}, which this model does not have "
                                 f"(it has: {', '.join(self.processors) or 'none'})")
            processed[modality] = [self.processors[modality](source) for source in sources]
        return Example(prompt=prompt, inputs=processed, target=target, id=id)

    def format_conversation(self, turns: list[dict[str, str]]) -> tuple[str, str | None]:
        """`turns` as (prompt, target) in this model's template: the one place training and inference format."""
        return format_conversation(turns, self.spec.template, self.tokenizer, self.spec.chat_template)

    def conversation_example(self, turns: list[dict[str, str]], inputs: dict[str, Sequence[Any]] | None = None,
                             id: str = "") -> Example:
        prompt, target = self.format_conversation(turns)
        return self.example(prompt, inputs, target, id)

    def assemble(self, examples: list[Example], padding_side: Literal["left", "right"] = "right",
                 encoded: Collection[str] = ()) -> Batch:
        """One padded batch; the inputs of the modalities in `encoded` are encoder outputs, not processed media."""
        embed = self.llm.get_input_embeddings()
        return self.assembler(
            examples,
            encode=lambda modality, x: self.branches[modality](x.to(self.device, self._dtype_of(modality)),
                                                               encoded=modality in encoded),
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
        eos = self.tokenizer.eos_token_id
        tokens: list[list[int]] = [[] for _ in examples]
        if max_new_tokens <= 0:
            return ["" for _ in examples]
        state, logits = prefill(self, self.assemble(examples, padding_side="left"))
        active = list(range(len(examples)))
        for count in range(max_new_tokens):
            chosen = choose(logits, temperature, generator=generator)
            for row, token in zip(active, chosen.tolist(), strict=True):
                tokens[row].append(token)
                if on_token is not None:
                    on_token(row, token)
            running = [index for index, token in enumerate(chosen.tolist()) if token != eos]
            if not running or count + 1 == max_new_tokens:
                break
            if len(running) < len(active):
                keep = torch.tensor(running, device=self.device)
                state.keep(keep)
                chosen = chosen[keep]
                active = [active[index] for index in running]
            logits = step(self, state, chosen)
        return [self.tokenizer.decode(_until_eos(row, eos), skip_special_tokens=True) for row in tokens]

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
        """Fold the text route's delta into the base weights: generated tokens then cost what the base
        LLM costs; modality routes apply `D_m - D_text` to their own tokens only.

        Over a quantized base this does nothing: the text route's delta stays a route, applied unfused on
        every token (a rank-R product beside each base matmul), and the model answers the same."""
        if self.routing.folded or self.quantized:
            return
        text = self.routing.route_to_delta.get(TEXT_ROUTE)
        modality_routes = {r: self.routing.route_to_delta.get(r, "__base__")
                           for r in self.spec.route_ids().values() if r != TEXT_ROUTE}
        corrections = {r: name for r, name in modality_routes.items()
                       if name != text and not (name == "__base__" and text is None)}
        for layer in self.routed.values():
            layer.fold(text, set(corrections.values()))
        self.routing.folded_route_to_delta = corrections
        self.routing.folded = True

    def unfold_text_route(self) -> None:
        if not self.routing.folded:
            return
        for layer in self.routed.values():
            layer.unfold()
        self.routing.folded = False
        self.routing.folded_route_to_delta = {}

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
                        dtype: torch.dtype | None = None, quantize: str | None = None) -> MultimodalLLM:
        """Rebuild a saved model: load its base LLM (from `base`, else where the manifest points; its
        fingerprint must match), then its own tensors, strictly. Local files only.

        `quantize` ("8bit" | "4bit"): the base's linears quantized with bitsandbytes (`load_base`); the
        checkpoint's own tensors then take the 16-bit compute dtype (`dtype`, else bfloat16)."""
        if quantize is not None:
            dtype = check_quantize(quantize, dtype)
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
        llm, tokenizer = load_base(base_path, dtype, quantize=quantize)
        model = cls(llm, tokenizer, manifest.model, base_path, fingerprint)
        model.provenance = dict(manifest.provenance)
        tensors = read_tensors(checkpoint_files(directory, manifest.files))
        if dtype is not None:
            model.branches.to(dtype)
            tensors = {name: tensor.to(dtype) if tensor.is_floating_point() else tensor
                       for name, tensor in tensors.items()}
        model.load_checkpoint_tensors(tensors)
        return model


def _until_eos(tokens: list[int], eos: int | None) -> list[int]:
    return tokens[: tokens.index(eos)] if eos is not None and eos in tokens else tokens


def load_base(base_path: str | Path, dtype: torch.dtype | None = None,
              quantize: str | None = None) -> tuple[PreTrainedModel, Any]:
    """Load a local base LLM and its tokenizer (never from a hub), frozen.

    `quantize` ("8bit" | "4bit"): its linears quantized by bitsandbytes as transformers loads them (the
    LM head and embeddings stay in `dtype`, bfloat16 when None); checked before anything is loaded."""
    path = Path(base_path)
    if not (path / "config.json").is_file():
        raise MMComposeError(f"{path}: not a base LLM directory (no config.json)")
    options: dict[str, Any] = {}
    if quantize is not None:
        dtype = check_quantize(quantize, dtype)
        options["quantization_config"] = quantization_config(quantize, dtype)
    llm = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype, **options)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    llm.requires_grad_(False)
    llm.eval()
    return llm, tokenizer
