"""Foreign checkpoints made locally with random weights: a tiny LLaVA, a tiny CLIP, an official-layout
ModelCompose directory, Video-LLaVA in both layouts with tiny LanguageBind towers, and LLaVA-1.5's LoRA
release layout, written with the key names the importers document."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModelForCausalLM,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    VideoLlavaConfig,
    VideoLlavaForConditionalGeneration,
)

from mmcompose.modalities.languagebind import LanguageBindVideoEncoder
from mmcompose.model.routed import DEFAULT_TARGET_MODULES

VISION = dict(hidden_size=24, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4, image_size=16,
              patch_size=4)
NUM_PATCHES = (16 // 4) ** 2
NUM_FRAMES = 8
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


def _perturb_llm(target: dict[str, torch.nn.Parameter], base: Path, scale: float) -> None:
    """`target` (parameters named as in a causal LM) := the base's weights plus a random perturbation of every
    target linear; rows beyond the base vocabulary keep their random values."""
    original = AutoModelForCausalLM.from_pretrained(base)
    state = {**{f"model.{k}": v for k, v in original.model.state_dict().items()},
             "lm_head.weight": original.lm_head.weight}
    with torch.no_grad():
        for name, parameter in target.items():
            reference = state[name]
            parameter[: reference.shape[0]] = reference
            if name.endswith(tuple(f"{m}.weight" for m in DEFAULT_TARGET_MODULES)):
                parameter.add_(torch.randn_like(parameter) * scale)


def make_video_llava_hf(directory: Path, base: Path, scale: float = 0.02, seed: int = 11,
                        extra_vocab: int = 4) -> VideoLlavaForConditionalGeneration:
    """A Video-LLaVA-hf: two CLIP towers, one projector, `<image>` / `<video>` = the first two rows appended to the
    base vocabulary (which is padded by `extra_vocab` rows, as 32000 -> 32064), 8 frames with CLS per video."""
    text = LlamaConfig.from_pretrained(base)
    vocab = text.vocab_size
    text.vocab_size = vocab + extra_vocab
    config = VideoLlavaConfig(vision_config=CLIPVisionConfig(**VISION), text_config=text, image_token_index=vocab,
                              video_token_index=vocab + 1, vision_feature_layer=-2,
                              vision_feature_select_strategy="default", image_seq_length=NUM_PATCHES,
                              video_seq_length=NUM_FRAMES * (NUM_PATCHES + 1))
    torch.manual_seed(seed)
    model = VideoLlavaForConditionalGeneration(config).eval()
    parts = {f"model.{k}": v for k, v in model.model.language_model.named_parameters()}
    parts["lm_head.weight"] = model.lm_head.weight
    _perturb_llm(parts, base, scale)
    model.save_pretrained(directory)
    return model


def make_languagebind_image(directory: Path, seed: int = 5) -> CLIPVisionModel:
    """A LanguageBind_Image directory: a LanguageBind config (vision tower without temporal attention) and weights
    holding the CLIP vision tower under `vision_model.*` beside text-tower tensors the image encoder ignores."""
    torch.manual_seed(seed)
    tower = CLIPVisionModel(CLIPVisionConfig(**VISION, hidden_act="gelu")).eval()  # OpenCLIP's exact GELU
    directory.mkdir(parents=True)
    vision = {**VISION, "add_time_attn": False, "num_frames": 1, "force_patch_dropout": 0.0, "hidden_act": "gelu"}
    (directory / "config.json").write_text(json.dumps({
        "architectures": ["LanguageBindImage"], "model_type": "LanguageBindImage", "projection_dim": 8,
        "vision_config": vision, "text_config": {"hidden_size": 8, "num_hidden_layers": 1}}))
    tensors = {"vision_model." + k.removeprefix("vision_model."): v.contiguous() for k, v in tower.state_dict().items()}
    tensors.update({"text_model.final_layer_norm.weight": torch.ones(8), "logit_scale": torch.tensor(4.6),
                    "visual_projection.weight": torch.randn(8, VISION["hidden_size"])})
    save_file(tensors, directory / "model.safetensors")
    return tower


def make_languagebind_video(directory: Path, seed: int = 6) -> LanguageBindVideoEncoder:
    """A LanguageBind_Video_merge directory of our tiny width (CLIP with temporal attention, 8 frames)."""
    torch.manual_seed(seed)
    vision = {**VISION, "add_time_attn": True, "num_frames": NUM_FRAMES, "hidden_act": "gelu"}
    encoder = LanguageBindVideoEncoder(vision).eval()
    with torch.no_grad():
        for parameter in encoder.parameters():
            parameter.normal_(0, 0.05)
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps({"model_type": "LanguageBindVideo", "vision_config": vision}))
    save_file({k: v.contiguous() for k, v in encoder.state_dict().items()}, directory / "model.safetensors")
    return encoder


def make_video_llava(directory: Path, base: Path, scale: float = 0.02, seed: int = 13, extra_vocab: int = 1,
                     towers: dict[str, torch.nn.Module] | None = None) -> tuple[LlamaForCausalLM, torch.nn.Module]:
    """An original-layout Video-LLaVA (`LlavaLlamaForCausalLM`): config.json = the base's LLaMA config plus the
    multimodal fields, weights in one pickled `pytorch_model.bin` (`model.*`, `lm_head.weight`,
    `model.mm_projector.{0,2}.*`, and the towers' `vision_model.*` under `model.{image,video}_tower.*_tower.` when
    `towers` is given). Returns the fine-tuned LLM and the projector, the parts of a reference forward."""
    text = LlamaConfig.from_pretrained(base)
    text.vocab_size += extra_vocab
    torch.manual_seed(seed)
    llm = LlamaForCausalLM(text).eval()
    _perturb_llm(dict(llm.named_parameters()), base, scale)
    hidden, width = text.hidden_size, VISION["hidden_size"]
    projector = torch.nn.Sequential(torch.nn.Linear(width, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, hidden))
    config = json.loads((base / "config.json").read_text())
    config.update(architectures=["LlavaLlamaForCausalLM"], model_type="llava", vocab_size=text.vocab_size,
                  mm_image_tower="LanguageBind/LanguageBind_Image",
                  mm_video_tower="LanguageBind/LanguageBind_Video_merge",
                  mm_hidden_size=width, mm_projector_type="mlp2x_gelu", mm_vision_select_layer=-2,
                  mm_vision_select_feature="patch", image_aspect_ratio="pad", mm_use_im_start_end=False)
    state = {**llm.state_dict(), **{f"model.mm_projector.{k}": v for k, v in projector.state_dict().items()}}
    for modality, tower in (towers or {}).items():
        prefix = f"model.{modality}_tower.{modality}_tower."
        state.update({prefix + "vision_model." + k.removeprefix("vision_model."): v
                      for k, v in tower.state_dict().items()})
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(config))
    torch.save(state, directory / "pytorch_model.bin")
    return llm, projector.eval()


def make_llava_lora(directory: Path, base: Path, rank: int = 8, alpha: int = 16, seed: int = 17,
                    projector_file: bool = True) -> tuple[torch.nn.Module, torch.nn.Module]:
    """LLaVA-1.5's LoRA release layout: config.json (LLaVA fields over the base's LLaMA config), a PEFT LoRA on all
    seven linears (`adapter_config.json` + pickled `adapter_model.bin`, as released), and the projector in
    `non_lora_trainables.bin` under `base_model.model.model.mm_projector.`. Returns the PEFT model (the LoRA on
    every token) and the projector."""
    torch.manual_seed(seed)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(DEFAULT_TARGET_MODULES))).eval()
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.1)
    peft_model.save_pretrained(directory)
    torch.save(load_file(directory / "adapter_model.safetensors"), directory / "adapter_model.bin")
    (directory / "adapter_model.safetensors").unlink()
    config = json.loads((base / "config.json").read_text())
    hidden, width = config["hidden_size"], VISION["hidden_size"]
    config.update(architectures=["LlavaLlamaForCausalLM"], model_type="llava", mm_vision_tower="openai/clip-tiny",
                  mm_hidden_size=width, mm_projector_type="mlp2x_gelu", mm_vision_select_layer=-2,
                  mm_vision_select_feature="patch", image_aspect_ratio="pad")
    (directory / "config.json").write_text(json.dumps(config))
    projector = torch.nn.Sequential(torch.nn.Linear(width, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, hidden))
    if projector_file:
        torch.save({f"base_model.model.model.mm_projector.{k}": v for k, v in projector.state_dict().items()},
                   directory / "non_lora_trainables.bin")
    return peft_model, projector.eval()


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
