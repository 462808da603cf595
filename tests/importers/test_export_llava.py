"""llava-hf export: a plain-LLaVA composition written as a LlavaForConditionalGeneration that transformers loads and
that gives our model's logits; anything else refused in one line before anything is written."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

from mmcompose.checkpoint import fingerprint_base, load_checkpoint, save_checkpoint
from mmcompose.compose.config import parse_config
from mmcompose.compose.engine import compose
from mmcompose.errors import CheckpointError
from mmcompose.importers import import_llava_hf
from mmcompose.importers.export import export_llava_hf
from mmcompose.model import Component, DeltaSpec, ModelSpec, MultimodalLLM, load_base, modality_spec
from tests.importers.fixtures import VISION, make_llava
from tests.model.helpers import randomize_deltas, tiny_modality

QUESTION = "what is this?"


def image_file(directory: Path) -> Path:
    pixels = np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(directory / "cat.png")
    return directory / "cat.png"


def compare(checkpoint: Path, exported: Path, image: Path) -> float:
    """Max |logit difference| over the base vocabulary between our model and the exported LLaVA, each fed through
    its own processor and prompt format (the exported chat template against our conversation template)."""
    ours = load_checkpoint(checkpoint).eval()
    llava, info = LlavaForConditionalGeneration.from_pretrained(exported, output_loading_info=True)
    assert not any(info.values()), info
    processor = AutoProcessor.from_pretrained(exported)
    prompt = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                                                          {"type": "text", "text": QUESTION}]}])
    inputs = processor(images=Image.open(image), text=prompt, return_tensors="pt")
    ours_prompt, _ = ours.format_conversation([{"from": "human", "value": "<image>\n" + QUESTION}])
    assert prompt == ours.tokenizer.bos_token + ours_prompt  # the tiny tokenizer adds no BOS: the template does
    vocab = ours.llm.config.vocab_size
    with torch.no_grad():
        expected = ours(ours.assemble([ours.example(ours_prompt, {"image": [image]})])).logits
        got = llava.eval()(**inputs).logits
    assert got.shape[:2] == expected.shape[:2] and got.shape[-1] == vocab + 1
    assert int((inputs["input_ids"] == vocab).sum()) == ours.input_length("image", ours.processors["image"](image))
    return float((got[..., :vocab] - expected).abs().max())


def test_llava_import_exports_to_an_equal_llava(llama_base: Path, tmp_path: Path) -> None:
    make_llava(tmp_path / "llava", llama_base)
    checkpoint = import_llava_hf(tmp_path / "llava", tmp_path / "image", base=llama_base, svd_rank=4)
    out, notes = export_llava_hf(checkpoint, tmp_path / "hf")
    assert notes == [] and (out / "model.safetensors.index.json").is_file()
    assert compare(checkpoint, out, image_file(tmp_path)) < 1e-5


def test_a_naive_composition_exports(llama_base: Path, tmp_path: Path) -> None:
    """NaiveMC of one image model: its merged delta (lambda times the model's) serves every token."""
    make_llava(tmp_path / "llava", llama_base)
    import_llava_hf(tmp_path / "llava", tmp_path / "image", base=llama_base, svd_rank=4)
    config = parse_config({"method": "naive", "models": [{"path": str(tmp_path / "image"), "lambda": 0.7}]})
    composed = compose(config, tmp_path / "naive", progress=False)
    out, _ = export_llava_hf(composed, tmp_path / "hf")
    assert compare(composed, out, image_file(tmp_path)) < 1e-5


def test_a_linear_connector_with_cls_exports_exactly(llama_base: Path, tmp_path: Path) -> None:
    """A `linear` connector (identity linear_2, linear activation) and a CLS-keeping tower (strategy full) over a
    vicuna_v1 template: a shared LoRA image model, as NaiveMC or a `shared` training gives."""
    image = modality_spec("image", encoder=Component(type="clip-vision", options=dict(
        config={**VISION, "hidden_act": "gelu"}, feature_layer=-1, drop_cls=False)),
        connector=Component(type="linear"), processor=Component(type="clip-image", options=dict(
            size=16, crop_size=16)))
    spec = ModelSpec(modalities=[image], deltas=[DeltaSpec(name="merged", kind="lora", routes=["text", "image"],
                                                           rank=2, alpha=4.0)],
                     template="vicuna_v1", strategy="composed")
    llm, tokenizer = load_base(llama_base)
    model = MultimodalLLM(llm, tokenizer, spec, llama_base, fingerprint_base(llama_base))
    randomize_deltas(model)
    checkpoint = save_checkpoint(model, tmp_path / "model")
    out, _ = export_llava_hf(checkpoint, tmp_path / "hf")
    assert compare(checkpoint, out, image_file(tmp_path)) < 1e-5


def _spec_model(base: Path, spec: ModelSpec, directory: Path) -> Path:
    llm, tokenizer = load_base(base)
    return save_checkpoint(MultimodalLLM(llm, tokenizer, spec, base, fingerprint_base(base)), directory)


def clip_image(**changes: object) -> object:
    return modality_spec("image", encoder=Component(type="clip-vision", options=dict(config=VISION)),
                         connector=Component(type="mlp2x_gelu"), **changes)


@pytest.mark.parametrize(("spec", "message"), [
    (ModelSpec(modalities=[clip_image(), tiny_modality("audio")]),
     r"it has 2 modalities \(image, audio\); LlavaForConditionalGeneration takes exactly one image input"),
    (ModelSpec(modalities=[tiny_modality("image")]), "encoder 'image-patch': a LLaVA's vision tower is a CLIP"),
    (ModelSpec(modalities=[clip_image(num_prefix_tokens=2)]), r"image has boundary tokens \(2 prefix, 0 suffix\)"),
    (ModelSpec(modalities=[clip_image()], strategy="decoupled", deltas=[
        DeltaSpec(name="language", kind="lora", routes=["text"], rank=2, alpha=2.0),
        DeltaSpec(name="image", kind="lora", routes=["image"], rank=2, alpha=2.0)]),
     r"per-token routed deltas \(text: language, image: image\); a LLaVA applies one set of LLM weights"),
    (ModelSpec(modalities=[clip_image()], strategy="decoupled", deltas=[
        DeltaSpec(name="image", kind="lora", routes=["image"], rank=2, alpha=2.0)]),
     r"per-token routed deltas \(text: base, image: image\)"),
])
def test_what_a_llava_cannot_carry_is_refused_before_writing(llama_base: Path, tmp_path: Path, spec: ModelSpec,
                                                             message: str) -> None:
    checkpoint = _spec_model(llama_base, spec, tmp_path / "model")
    with pytest.raises(CheckpointError, match="cannot be exported as a llava-hf LLaVA: " + message) as raised:
        export_llava_hf(checkpoint, tmp_path / "hf")
    assert "\n" not in str(raised.value)
    assert not (tmp_path / "hf").exists()
