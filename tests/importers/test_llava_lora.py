"""LLaVA-1.5 LoRA release import: an exact low-rank `shared` delta plus the projector, equal to LLaVA's forward."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import CLIPVisionModel

from mmcompose.checkpoint import load_checkpoint
from mmcompose.errors import CheckpointError
from mmcompose.importers.llava_lora import import_llava_lora
from mmcompose.model import Example, MultimodalLLM
from tests.conftest import make_base
from tests.importers.fixtures import make_clip, make_llava_lora

BEFORE, AFTER = "USER: ", "\nwhat is this? ASSISTANT:"


def reference_logits(peft_model: torch.nn.Module, projector: torch.nn.Module, clip: CLIPVisionModel,
                     model: MultimodalLLM, pixels: torch.Tensor) -> torch.Tensor:
    """LLaVA's forward: CLIP layer -2 without CLS -> projector, spliced between the prompt's embeddings, through the
    LLM with the LoRA on every token (PEFT's own module)."""
    embed = peft_model.get_input_embeddings()
    tokens = lambda text: embed(torch.tensor([model.tokenizer(text, add_special_tokens=False).input_ids]))  # noqa: E731
    with torch.no_grad():
        features = projector(clip(pixels[None], output_hidden_states=True).hidden_states[-2][:, 1:])
        embeds = torch.cat([embed(torch.tensor([[model.tokenizer.bos_token_id]])), tokens(BEFORE), features,
                            tokens(AFTER)], dim=1)
        return peft_model(inputs_embeds=embeds).logits


def test_lora_release_is_an_exact_shared_delta(llama_base: Path, tmp_path: Path) -> None:
    peft_model, projector = make_llava_lora(tmp_path / "llava-v1.5-7b-lora", llama_base)
    clip = make_clip(tmp_path / "clip")
    model = load_checkpoint(import_llava_lora(tmp_path / "llava-v1.5-7b-lora", tmp_path / "out", base=llama_base,
                                              encoder=clip))
    assert [(d.name, d.kind, d.rank, d.alpha, d.routes) for d in model.spec.deltas] == [
        ("shared", "lora", 8, 16.0, ["text", "image"])]
    pixels = torch.randn(3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = model.eval()(model.assemble([Example(prompt=BEFORE + "<image>" + AFTER, inputs={"image": [pixels]})]))
    expected = reference_logits(peft_model, projector, CLIPVisionModel.from_pretrained(clip).eval(), model, pixels)
    assert float((got.logits - expected).abs().max()) < 1e-5
    processor = model.spec.modalities[0].processor
    assert processor.type == "clip-image" and processor.options["pad_to_square"] is True


def test_a_release_without_its_projector_is_one_line(llama_base: Path, tmp_path: Path) -> None:
    make_llava_lora(tmp_path / "lora", llama_base, projector_file=False)
    with pytest.raises(CheckpointError, match=r"no non_lora_trainables.bin: the release's projector is missing"):
        import_llava_lora(tmp_path / "lora", tmp_path / "out", base=llama_base, encoder=make_clip(tmp_path / "clip"))
    assert not (tmp_path / "out").exists()


def test_a_projector_file_with_more_than_the_projector_is_refused(llama_base: Path, tmp_path: Path) -> None:
    make_llava_lora(tmp_path / "lora", llama_base)
    state = torch.load(tmp_path / "lora" / "non_lora_trainables.bin", weights_only=True)
    state["base_model.model.model.embed_tokens.weight"] = torch.zeros(2, 2)
    torch.save(state, tmp_path / "lora" / "non_lora_trainables.bin")
    with pytest.raises(CheckpointError, match=r"non_lora_trainables.bin: 1 unknown key\(s\): "
                                              r"base_model.model.model.embed_tokens.weight"):
        import_llava_lora(tmp_path / "lora", tmp_path / "out", base=llama_base, encoder=make_clip(tmp_path / "clip"))


def test_a_base_of_another_shape_is_one_line(llama_base: Path, tmp_path: Path) -> None:
    make_llava_lora(tmp_path / "lora", llama_base)
    other = make_base(tmp_path / "other", hidden=48)
    with pytest.raises(CheckpointError, match="its LLM has hidden_size=32, the base LLM has hidden_size=48"):
        import_llava_lora(tmp_path / "lora", tmp_path / "out", base=other, encoder=make_clip(tmp_path / "clip"))
    config = json.loads((tmp_path / "lora" / "config.json").read_text())
    for field in ("hidden_size", "intermediate_size", "head_dim"):  # a config hiding the difference: factors show it
        config.pop(field)
    (tmp_path / "lora" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"lora_A of .* has shape \(8, 32\), expected \(8, 48\)"):
        import_llava_lora(tmp_path / "lora", tmp_path / "out", base=other, encoder=make_clip(tmp_path / "clip"))
    assert not (tmp_path / "out").exists()
