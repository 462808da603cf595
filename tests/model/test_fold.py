"""Folding the text route keeps no copy of the base weights; unfolding reads them back from the base LLM's own
safetensors (sharded or not), bit for bit what a fresh load in the model's dtype gives."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from mmcompose.errors import CheckpointError
from mmcompose.model import Example, MultimodalLLM
from mmcompose.model.mllm import load_base
from tests.conftest import make_base
from tests.model.helpers import random_input, randomize_deltas, tiny_modality

MODALITIES = ["image", "audio"]


def _model(base: Path, strategy: str = "decoupled", dtype: torch.dtype | None = None) -> MultimodalLLM:
    model = MultimodalLLM.from_base(base, [tiny_modality(m, boundary=1) for m in MODALITIES], strategy=strategy,
                                    rank=4, alpha=8.0, dtype=dtype)
    randomize_deltas(model, seed=1, scale=0.3)
    return model.eval()


def _examples() -> list[Example]:
    generator = torch.Generator().manual_seed(0)
    return [Example(prompt="USER: <image>\n<audio>\nwhat do they share? ASSISTANT:",
                    inputs={m: [random_input(m, generator)] for m in MODALITIES}),
            Example(prompt="USER: hello ASSISTANT:")]


def _resave(source: Path, target: Path, dtype: torch.dtype, max_shard_size: str | None = None) -> Path:
    """The base at `source` stored again in `dtype`, in shards when `max_shard_size` is given."""
    llm = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    llm.save_pretrained(target, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    AutoTokenizer.from_pretrained(source).save_pretrained(target)
    return target


def _llm_weights(model: MultimodalLLM) -> dict[str, torch.Tensor]:
    """The base LLM's own weights, under the names of a bare load (deltas left out)."""
    return {name.replace(".base.", "."): p.detach().clone() for name, p in model.llm.named_parameters()
            if ".deltas." not in name}


def _assert_weights_equal(model: MultimodalLLM, expected: dict[str, torch.Tensor]) -> None:
    got = _llm_weights(model)
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        assert got[name].dtype == value.dtype and torch.equal(got[name], value), name


@pytest.mark.parametrize(("stored", "loaded"), [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32),
                                                (torch.bfloat16, torch.bfloat16)])
def test_unfold_gives_a_fresh_load_in_the_models_dtype_bit_for_bit(llama_base: Path, tmp_path: Path,
                                                                  stored: torch.dtype, loaded: torch.dtype) -> None:
    """When the model was loaded in another dtype than its base is stored in, "bit for bit" means: equal to a
    fresh load of the base in that dtype (the stored tensor cast as loading casts it)."""
    base = _resave(llama_base, tmp_path / "base", stored)
    model = _model(base, dtype=loaded)
    fresh = {name: p.detach() for name, p in load_base(base, loaded)[0].named_parameters()}
    _assert_weights_equal(model, fresh)
    model.fold_text_route()
    folded_q = model.routed["model.layers.0.self_attn.q_proj"].base.weight
    assert not torch.equal(folded_q, fresh["model.layers.0.self_attn.q_proj.weight"])
    model.unfold_text_route()
    _assert_weights_equal(model, fresh)


@pytest.mark.parametrize("strategy", ["decoupled", "shared", "full"])
def test_sharded_base_folds_with_the_same_greedy_output_and_unfolds_exactly(llama_base: Path, tmp_path: Path,
                                                                           strategy: str) -> None:
    """Shared: text and modalities share one delta (no correction at all once folded); full: dense deltas."""
    base = _resave(llama_base, tmp_path / "sharded", torch.float32, max_shard_size="40KB")
    assert (base / "model.safetensors.index.json").is_file() and len(list(base.glob("*.safetensors"))) > 2
    model = _model(base, strategy)
    original = _llm_weights(model)
    held = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    unfolded = model.generate(_examples(), max_new_tokens=8)
    model.fold_text_route()
    assert sum(t.numel() * t.element_size() for t in model.state_dict().values()) == held
    assert not torch.equal(model.routed["model.layers.1.mlp.down_proj"].base.weight,
                           original["model.layers.1.mlp.down_proj.weight"])
    assert model.generate(_examples(), max_new_tokens=8) == unfolded
    model.unfold_text_route()
    _assert_weights_equal(model, original)
    assert model.generate(_examples(), max_new_tokens=8) == unfolded


def test_fold_refuses_when_a_target_weight_is_missing_from_the_base_files(llama_base: Path, tmp_path: Path) -> None:
    model = _model(llama_base)
    original = _llm_weights(model)
    moved = Path(shutil.copytree(llama_base, tmp_path / "moved"))
    tensors = load_file(moved / "model.safetensors")
    del tensors["model.layers.1.self_attn.v_proj.weight"]
    save_file(tensors, moved / "model.safetensors", metadata={"format": "pt"})
    model.base_path = str(moved)
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.self_attn\.v_proj\.weight"):
        model.fold_text_route()
    assert not model.routing.folded
    _assert_weights_equal(model, original)


def test_unfold_refuses_when_the_base_changed_on_disk(llama_base: Path, tmp_path: Path) -> None:
    base = Path(shutil.copytree(llama_base, tmp_path / "base"))
    model = _model(base)
    model.fold_text_route()
    folded = _llm_weights(model)
    make_base(tmp_path / "other", seed=7)
    # a new file in its place, as saving does (the loaded weights may still map the old one's pages)
    (tmp_path / "other" / "model.safetensors").replace(base / "model.safetensors")
    with pytest.raises(CheckpointError, match="changed on disk"):
        model.unfold_text_route()
    assert model.routing.folded
    _assert_weights_equal(model, folded)


def test_a_model_with_an_offloaded_layer_stays_unfolded(llama_base: Path) -> None:
    """Offloaded weights (on the meta device between forwards) are reloaded from their files at each forward, so
    nothing may be added into them: the whole model stays unfolded, every weight untouched."""
    model = _model(llama_base)
    original = _llm_weights(model)
    model.routed["model.layers.1.mlp.up_proj"].base.to("meta")
    original.pop("model.layers.1.mlp.up_proj.weight")
    model.fold_text_route()
    assert not model.routing.folded
    weights = _llm_weights(model)
    for name, value in original.items():
        assert torch.equal(weights[name], value), name
