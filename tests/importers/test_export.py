"""Standalone export: the exported LLM is the text route, and the exported checkpoint is the whole model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from mmcompose.checkpoint import fingerprint_base, load_checkpoint, save_checkpoint
from mmcompose.errors import CheckpointError
from mmcompose.importers import export_hf, import_llava_hf
from mmcompose.model import DeltaSpec, Example, ModelSpec, MultimodalLLM, load_base
from tests.importers.fixtures import make_llava
from tests.model.helpers import random_input, randomize_deltas, tiny_modality

PROMPT = "USER: what is this? ASSISTANT: This is a blorvin."


def partial_model(base: Path) -> MultimodalLLM:
    """Language delta on text, an image delta, and audio with no delta of its own (it sees the base)."""
    spec = ModelSpec(modalities=[tiny_modality("image", boundary=1), tiny_modality("audio")], strategy="decoupled",
                     deltas=[DeltaSpec(name="language", kind="lora", routes=["text"], rank=2, alpha=4.0),
                             DeltaSpec(name="image", kind="lora", routes=["image"], rank=3, alpha=3.0)])
    llm, tokenizer = load_base(base)
    return MultimodalLLM(llm, tokenizer, spec, base, fingerprint_base(base))


def shared_model(base: Path) -> MultimodalLLM:
    return MultimodalLLM.from_base(base, [tiny_modality("image", boundary=1), tiny_modality("audio")],
                                   strategy="shared", rank=2, alpha=4.0)


def multimodal_logits(model: MultimodalLLM) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    example = Example(prompt="USER: <image> and <audio> ok?", inputs={"image": [random_input("image", generator)],
                                                                      "audio": [random_input("audio", generator)]})
    with torch.no_grad():
        return model.eval()(model.assemble([example])).logits


def text_ids(model: MultimodalLLM) -> torch.Tensor:
    return torch.tensor([[model.tokenizer.bos_token_id, *model.tokenizer(PROMPT, add_special_tokens=False).input_ids]])


@pytest.mark.parametrize("build", [partial_model, shared_model])
def test_exported_llm_is_the_text_route_and_the_subfolder_the_whole_model(llama_base: Path, tmp_path: Path,
                                                                          build) -> None:
    model = build(llama_base)
    randomize_deltas(model, seed=6, scale=0.2)
    out = export_hf(save_checkpoint(model, tmp_path / "ckpt"), tmp_path / "hf")
    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        text = model.eval()(model.assemble([Example(prompt=PROMPT)])).logits
        torch.testing.assert_close(exported(input_ids=text_ids(model)).logits, text, rtol=0, atol=1e-5)
        assert (text - load_base(llama_base)[0](input_ids=text_ids(model)).logits).abs().max() > 1e-2
    reloaded = load_checkpoint(out / "mmcompose")
    torch.testing.assert_close(multimodal_logits(reloaded), multimodal_logits(model), rtol=0, atol=1e-5)
    manifest = json.loads((out / "mmcompose" / "manifest.json").read_text())
    assert manifest["base"]["path"] == ".." and manifest["provenance"]["folded_delta"] == model.spec.deltas[0].name
    if build is partial_model:
        assert [(d["name"], d["routes"], d["rank"]) for d in manifest["model"]["deltas"]] == [
            ("image", ["image"], 5), ("minus-text", ["audio"], 2)]
    else:
        assert manifest["model"]["deltas"] == [] and manifest["model"]["strategy"] == "connector-only"


def test_llava_import_then_export_reproduces_the_llavas_text_logits(llama_base: Path, tmp_path: Path) -> None:
    llava = make_llava(tmp_path / "llava", llama_base)
    out = export_hf(import_llava_hf(tmp_path / "llava", tmp_path / "image", base=llama_base), tmp_path / "hf")
    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = text_ids(load_checkpoint(out / "mmcompose"))
    with torch.no_grad():
        expected = llava(input_ids=ids).logits[..., : exported.config.vocab_size]
        torch.testing.assert_close(exported(input_ids=ids).logits, expected, rtol=0, atol=1e-4)


def test_export_refuses_a_moved_base(llama_base: Path, tmp_path: Path) -> None:
    checkpoint = save_checkpoint(shared_model(llama_base), tmp_path / "ckpt")
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    manifest["base"]["path"] = str(tmp_path / "nowhere")
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="base LLM not found"):
        export_hf(checkpoint, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
