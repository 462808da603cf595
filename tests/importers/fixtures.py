"""Foreign checkpoints made locally with random weights: a tiny LLaVA, a tiny CLIP, an official-layout
ModelCompose directory, written with the key names the importers document."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

from mmcompose.model.routed import DEFAULT_TARGET_MODULES

VISION = dict(hidden_size=24, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4, image_size=16,
              patch_size=4)
NUM_PATCHES = (16 // 4) ** 2
OFFICIAL_NAMES = {"image": "vision", "audio": "audio", "video": "video", "point": "point"}


def make_llava(directory: Path, base: Path, scale: float = 0.02, seed: int = 7) -> LlavaForConditionalGeneration:
    """A LLaVA whose language model is `base` plus a random perturbation of every target linear, with one
    extra vocabulary row (`<image>`, id = base vocabulary size), as llava-hf checkpoints have."""
    text = LlamaConfig.from_pretrained(base)
    vocab = text.vocab_size
    text.vocab_size = vocab + 1
    config = LlavaConfig(vision_config=CLIPVisionConfig(**VISION), text_config=text, image_token_id=vocab,
                         vision_feature_layer=-2, vision_feature_select_strategy="default",
                         projector_hidden_act="gelu")
    torch.manual_seed(seed)
    llava = LlavaForConditionalGeneration(config).eval()
    original = AutoModelForCausalLM.from_pretrained(base)
    state = original.model.state_dict()
    with torch.no_grad():
        for name, parameter in llava.model.language_model.named_parameters():
            parameter[: state[name].shape[0]] = state[name]
            if name.endswith(tuple(f"{m}.weight" for m in DEFAULT_TARGET_MODULES)):
                parameter.add_(torch.randn_like(parameter) * scale)
        llava.lm_head.weight[:vocab] = original.lm_head.weight
    llava.save_pretrained(directory)
    return llava


def make_clip(directory: Path, seed: int = 3) -> Path:
    torch.manual_seed(seed)
    CLIPVisionModel(CLIPVisionConfig(**VISION)).save_pretrained(directory)
    return directory


def linear_shapes(base: Path) -> dict[str, tuple[int, int]]:
    """`{module path: (out, in)}` of every target linear of the base LLM."""
    llm = AutoModelForCausalLM.from_pretrained(base)
    return {path: tuple(module.weight.shape) for path, module in llm.named_modules()
            if path.rpartition(".")[2] in DEFAULT_TARGET_MODULES}


def official_qformer_shapes(queries: int, layers: int, encoder_width: int, llm_width: int, width: int = 48,
                            intermediate: int = 24, positions: int = 1024) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes of the official `VideoLlamaAudioQformer` (a pruned LAVIS BERT Q-Former)."""
    shapes: dict[str, tuple[int, ...]] = {
        "audio_query_tokens": (1, queries, width), "audio_position_embedding.weight": (positions, encoder_width),
        "audio_Qformer.bert.embeddings.LayerNorm.weight": (width,),
        "audio_Qformer.bert.embeddings.LayerNorm.bias": (width,),
        "audio_llama_proj.weight": (llm_width, width), "audio_llama_proj.bias": (llm_width,),
    }
    for i in range(layers):
        layer = f"audio_Qformer.bert.encoder.layer.{i}"
        for block, context in (("attention", width), ("crossattention", encoder_width)):
            shapes.update({f"{layer}.{block}.self.query.weight": (width, width),
                           f"{layer}.{block}.self.key.weight": (width, context),
                           f"{layer}.{block}.self.value.weight": (width, context),
                           f"{layer}.{block}.output.dense.weight": (width, width)})
            shapes.update({f"{layer}.{block}.{part}.bias": (width,) for part in
                           ("self.query", "self.key", "self.value", "output.dense", "output.LayerNorm")})
            shapes[f"{layer}.{block}.output.LayerNorm.weight"] = (width,)
        shapes.update({f"{layer}.intermediate_query.dense.weight": (intermediate, width),
                       f"{layer}.intermediate_query.dense.bias": (intermediate,),
                       f"{layer}.output_query.dense.weight": (width, intermediate),
                       f"{layer}.output_query.dense.bias": (width,),
                       f"{layer}.output_query.LayerNorm.weight": (width,),
                       f"{layer}.output_query.LayerNorm.bias": (width,)})
    return shapes


def make_modelcompose(directory: Path, base: Path, strategy: str, *, widths: dict[str, int], rank: int = 4,
                      alpha: int = 8, boundary: int = 2, projectors: dict[str, str] | None = None,
                      prefix: str = "", seed: int = 0) -> dict[str, torch.Tensor]:
    """An official-layout checkpoint (config.json + adapter_model.bin) for our modalities `widths`
    (`{modality: encoder width}`); returns the state dict it saved."""
    projectors = projectors or {"image": "mlp2x_gelu", "audio": "linear"}
    config = json.loads((base / "config.json").read_text())
    hidden = config["hidden_size"]
    config.update(model_type="multimodal", architectures=["MultimodalLlamaForCausalLM"], lora_strategy=strategy,
                  lora_r=rank, lora_alpha=alpha, local_prefix_tokens=boundary, local_suffix_tokens=boundary)
    generator = torch.Generator().manual_seed(seed)

    def random(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * 0.1

    state: dict[str, torch.Tensor] = {}
    adapters = ["default"] if strategy == "same" else [OFFICIAL_NAMES[m] for m in widths]
    if strategy == "modal+language":
        adapters.insert(0, "default")
    for path, (out, inp) in linear_shapes(base).items():
        for adapter in adapters:
            state[f"{prefix}{path}.lora_A.{adapter}.weight"] = random(rank, inp)
            state[f"{prefix}{path}.lora_B.{adapter}.weight"] = random(out, rank)
    for modality, width in widths.items():
        official = OFFICIAL_NAMES[modality]
        key = "mm" if modality == "image" else f"mm_{modality}"
        if modality == "video":
            config.update(mm_video_select_layer=-2, mm_video_select_feature="patch")
        config.update({f"{key}_projector_type": projectors[modality], f"{key}_hidden_size": width})
        config["mm_vision_tower" if modality == "image" else f"mm_{modality}_encoder"] = f"/official/{official}-encoder"
        projector = f"{prefix}model.modal_projectors.{official}"
        if projectors[modality].startswith("qformer_"):
            queries, layers = (int(n) for n in projectors[modality][len("qformer_"):-1].split("N_"))
            state.update({f"{projector}.{name}": random(*shape) for name, shape in
                          official_qformer_shapes(queries, layers, width, hidden).items()})
            state[f"{projector}.audio_Qformer.bert.embeddings.position_ids"] = torch.arange(512).unsqueeze(0)
        elif projectors[modality] == "mlp2x_gelu":
            state.update({f"{projector}.0.weight": random(hidden, width), f"{projector}.0.bias": random(hidden),
                          f"{projector}.2.weight": random(hidden, hidden), f"{projector}.2.bias": random(hidden)})
        else:
            state.update({f"{projector}.weight": random(hidden, width), f"{projector}.bias": random(hidden)})
    config.update(mm_vision_select_layer=-2, mm_vision_select_feature="patch")
    for official in ["default", *(OFFICIAL_NAMES[m] for m in widths)]:
        state[f"{prefix}prefix_tokens.{official}"] = random(1, boundary, hidden)
        state[f"{prefix}suffix_tokens.{official}"] = random(1, boundary, hidden)
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(config))
    torch.save(state, directory / "adapter_model.bin")
    return state
