"""Proof that wrapping and assembly are right: our model equals PEFT and transformers' LLaVA on the same weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from mmcompose.model import Component, Example, MultimodalLLM, modality_spec
from mmcompose.model.routed import DEFAULT_TARGET_MODULES
from tests.conftest import CORPUS
from tests.model.helpers import randomize_deltas

PROMPT = "USER: what is this? ASSISTANT: This is a blorvin."


def test_shared_lora_equals_peft(llama_base: Path) -> None:
    model = MultimodalLLM.from_base(llama_base, [], strategy="shared", rank=4, alpha=8.0)
    randomize_deltas(model, seed=3, scale=0.2)
    reference = get_peft_model(
        AutoModelForCausalLM.from_pretrained(llama_base),
        LoraConfig(r=4, lora_alpha=8, target_modules=list(DEFAULT_TARGET_MODULES), lora_dropout=0.0),
    )
    ours = model.checkpoint_tensors()
    with torch.no_grad():
        for name, parameter in reference.named_parameters():
            if "lora_" in name:
                path = name.removeprefix("base_model.model.").replace(".default", "")
                path, _, factor = path.rpartition(".lora_")
                factor = "lora_" + factor.removesuffix(".weight")
                parameter.copy_(ours[f"deltas.shared.{path}.{factor}"])
    batch = model.assemble([Example(prompt=PROMPT)])
    ids = torch.tensor([[model.tokenizer.bos_token_id, *model.tokenizer(PROMPT, add_special_tokens=False).input_ids]])
    with torch.no_grad():
        expected = reference(input_ids=ids).logits
        got = model(batch).logits
        with reference.disable_adapter():
            assert (expected - reference(input_ids=ids).logits).abs().max() > 1e-3  # the LoRA matters
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def _tiny_llava(directory: Path, vocab_size: int, image_token: int) -> LlavaForConditionalGeneration:
    vision = CLIPVisionConfig(hidden_size=24, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                              image_size=16, patch_size=4, projection_dim=24)
    text = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=image_token,
                         vision_feature_layer=-2, vision_feature_select_strategy="default",
                         projector_hidden_act="gelu")
    torch.manual_seed(7)
    llava = LlavaForConditionalGeneration(config).eval()
    llava.save_pretrained(directory)
    return llava


def test_image_model_from_llava_equals_transformers_llava(tmp_path: Path) -> None:
    from mmcompose.train.tokenizer import train_tokenizer

    tokenizer = train_tokenizer(CORPUS, vocab_size=320)
    image_token = len(tokenizer)  # one id beyond the text vocabulary, as llava-hf adds <image>
    llava = _tiny_llava(tmp_path / "llava", len(tokenizer) + 1, image_token)

    base = tmp_path / "base"  # the LLaVA's own language model as a stock causal LM
    language = AutoModelForCausalLM.from_config(llava.config.text_config)
    language.model.load_state_dict(llava.model.language_model.state_dict())
    language.lm_head.load_state_dict(llava.lm_head.state_dict())
    language.save_pretrained(base)
    tokenizer.save_pretrained(base)

    vision_options = dict(config=llava.config.vision_config.to_dict(), feature_layer=-2, drop_cls=True)
    image = modality_spec("image", encoder=Component(type="clip-vision", options=vision_options),
                          connector=Component(type="mlp2x_gelu"))
    model = MultimodalLLM.from_base(base, [image]).eval()
    branch = model.branches["image"]
    branch.encoder.model.load_state_dict(llava.model.vision_tower.state_dict())
    projector = llava.model.multi_modal_projector
    branch.connector.load_state_dict({"0.weight": projector.linear_1.weight, "0.bias": projector.linear_1.bias,
                                      "2.weight": projector.linear_2.weight, "2.bias": projector.linear_2.bias})

    pixels = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    before, after = "USER: ", "\nwhat is this? ASSISTANT:"
    with torch.no_grad():
        batch = model.assemble([Example(prompt=before + "<image>" + after, inputs={"image": [pixels[0]]})])
        got = model(batch).logits
        num_image_tokens = (16 // 4) ** 2
        ids = [tokenizer.bos_token_id, *tokenizer(before, add_special_tokens=False).input_ids,
               *[image_token] * num_image_tokens, *tokenizer(after, add_special_tokens=False).input_ids]
        expected = llava(input_ids=torch.tensor([ids]), pixel_values=pixels).logits
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("strategy", ["shared", "decoupled"])
def test_text_only_prompt_with_untrained_deltas_equals_base(llama_base: Path, strategy: str) -> None:
    """Zero-initialised LoRA B: a fresh modality model is exactly its base LLM on text."""
    model = MultimodalLLM.from_base(llama_base, [], strategy=strategy)
    base = AutoModelForCausalLM.from_pretrained(llama_base)
    ids = torch.tensor([[model.tokenizer.bos_token_id, *model.tokenizer(PROMPT, add_special_tokens=False).input_ids]])
    with torch.no_grad():
        torch.testing.assert_close(model(model.assemble([Example(prompt=PROMPT)])).logits, base(input_ids=ids).logits)
