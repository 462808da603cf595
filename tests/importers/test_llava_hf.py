"""llava-hf import: the imported image model computes what `LlavaForConditionalGeneration` computes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mmcompose.checkpoint import load_checkpoint
from mmcompose.errors import CheckpointError
from mmcompose.importers import import_llava_hf
from mmcompose.model import Example, MultimodalLLM
from tests.importers.fixtures import NUM_PATCHES, make_llava

BEFORE, AFTER = "USER: ", "\nwhat is this? ASSISTANT:"


@pytest.fixture(scope="module")
def llava(llama_base: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    directory = tmp_path_factory.mktemp("llava")
    return directory, make_llava(directory, llama_base)


def compare(model: MultimodalLLM, llava: torch.nn.Module) -> float:
    """Largest logit difference on one image + prompt, over the base vocabulary."""
    pixels = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    tokenizer, vocab = model.tokenizer, model.llm.config.vocab_size
    ids = [tokenizer.bos_token_id, *tokenizer(BEFORE, add_special_tokens=False).input_ids,
           *[vocab] * NUM_PATCHES, *tokenizer(AFTER, add_special_tokens=False).input_ids]
    with torch.no_grad():
        got = model.eval()(model.assemble([Example(prompt=BEFORE + "<image>" + AFTER,
                                                   inputs={"image": [pixels[0]]})])).logits
        expected = llava(input_ids=torch.tensor([ids]), pixel_values=pixels).logits[..., :vocab]
    assert got.shape == expected.shape
    return float((got - expected).abs().max())


def test_dense_import_equals_llava(llava, llama_base: Path, tmp_path: Path) -> None:
    directory, reference = llava
    out = import_llava_hf(directory, tmp_path / "image", base=llama_base)
    model = load_checkpoint(out)
    assert compare(model, reference) < 1e-4
    manifest = json.loads((out / "manifest.json").read_text())
    assert [d["kind"] for d in manifest["model"]["deltas"]] == ["dense"]
    assert manifest["model"]["deltas"][0]["routes"] == ["text", "image"]
    assert any("dropped 1 vocabulary row" in note for note in manifest["provenance"]["notes"])


def test_full_rank_svd_is_exact_and_low_rank_reports_its_error(llava, llama_base: Path, tmp_path: Path) -> None:
    directory, reference = llava
    exact = load_checkpoint(import_llava_hf(directory, tmp_path / "full", base=llama_base, svd_rank=32))
    assert exact.provenance["svd_relative_error"] < 1e-5
    assert compare(exact, reference) < 1e-4
    low = load_checkpoint(import_llava_hf(directory, tmp_path / "low", base=llama_base, svd_rank=2))
    assert 0.5 < low.provenance["svd_relative_error"] < 1
    assert low.spec.deltas[0].rank == 2
    assert compare(low, reference) > 1e-3


def test_newer_key_layout_imports_the_same(llava, llama_base: Path, tmp_path: Path) -> None:
    directory, _ = llava
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    (renamed / "config.json").write_text((directory / "config.json").read_text())
    layout = {"language_model.model.": "model.language_model.", "language_model.lm_head.": "lm_head.",
              "vision_tower.": "model.vision_tower.vision_model.",
              "multi_modal_projector.": "model.multi_modal_projector."}
    tensors = {}
    for name, value in load_file(directory / "model.safetensors").items():
        old = next(prefix for prefix in layout if name.startswith(prefix))
        tensors[layout[old] + name.removeprefix(old)] = value
    save_file(tensors, renamed / "model.safetensors")
    first = load_file(import_llava_hf(directory, tmp_path / "a", base=llama_base) / "model.safetensors")
    second = load_file(import_llava_hf(renamed, tmp_path / "b", base=llama_base) / "model.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize(("tensor", "message"), [
    ("language_model.model.norm.weight", "language_model.model.norm.weight differs from the base"),
    ("language_model.model.embed_tokens.weight", "embed_tokens.weight differs from the base"),
])
def test_a_change_outside_the_target_linears_is_refused(llava, llama_base: Path, tmp_path: Path, tensor: str,
                                                         message: str) -> None:
    directory, _ = llava
    changed = tmp_path / "changed"
    changed.mkdir()
    (changed / "config.json").write_text((directory / "config.json").read_text())
    tensors = load_file(directory / "model.safetensors")
    tensors[tensor][0] += 1.0  # a row of the base vocabulary, not the appended one
    save_file(tensors, changed / "model.safetensors")
    with pytest.raises(CheckpointError, match=message):
        import_llava_hf(changed, tmp_path / "out", base=llama_base)
    assert not (tmp_path / "out").exists()


def test_not_a_llava(llama_base: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not a LLaVA checkpoint"):
        import_llava_hf(llama_base, tmp_path / "out", base=llama_base)
