"""Parity with mergekit 0.1.5 on tiny random LLaMA checkpoints: its merged model vs our operators applied to
``W_ft - W_base`` tensor by tensor.

Compared: ``task_arithmetic`` and ``ties`` (with ``normalize`` true and false). Not compared: mergekit's
``dare_linear`` / ``dare_ties``, which rescale survivors to the tensor's pre-drop L1 norm (``rescale: true``)
instead of by ``1 / density`` and draw from the global RNG in its own task order, so no seed makes the two
coincide; and TIES with ``count`` election, which mergekit's registry does not expose under ``ties``.
"""

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from mmcompose.compose.config import parse_merge_config
from mmcompose.compose.llm_merge import merge_llms
from mmcompose.compose.operators import METHODS

mergekit_config = pytest.importorskip("mergekit.config")
mergekit_merge = pytest.importorskip("mergekit.merge")
mergekit_options = pytest.importorskip("mergekit.options")

WEIGHTS = [0.5, 0.3, 0.2]
DENSITIES = [0.5, 0.3, 0.7]


def _load(directory: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    """A float32 base and three fine-tunes = base + independent random perturbations of every tensor."""
    root = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    base = LlamaForCausalLM(config)
    base.save_pretrained(root / "base", safe_serialization=True)
    finetunes = []
    for i in range(3):
        model = LlamaForCausalLM(config)
        with torch.no_grad():
            for param, base_param in zip(model.parameters(), base.parameters(), strict=True):
                param.copy_(base_param + 0.02 * torch.randn_like(base_param))
        model.save_pretrained(root / f"ft{i}", safe_serialization=True)
        finetunes.append(root / f"ft{i}")
    return root / "base", finetunes


def _run_mergekit(config: dict[str, Any], out: Path) -> dict[str, torch.Tensor]:
    merge_config = mergekit_config.MergeConfiguration.model_validate(config)
    options = mergekit_options.MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True)
    mergekit_merge.run_merge(merge_config, str(out), options)
    return _load(out)


@pytest.mark.parametrize(
    ("method", "global_params", "per_model", "ours", "our_params"),
    [
        ("task_arithmetic", {}, [{}] * 3, "linear", {}),
        # mergekit's ties default is normalize: true = divide by the sum of the agreeing weights.
        ("ties", {}, [{"density": d} for d in DENSITIES], "ties", {"density": DENSITIES}),
        (
            "ties",
            {"normalize": False},
            [{"density": d} for d in DENSITIES],
            "ties",
            {"density": DENSITIES, "normalize": "none"},
        ),
    ],
    ids=["task_arithmetic", "ties", "ties-unnormalized"],
)
def test_mergekit_parity(tmp_path, checkpoints, method, global_params, per_model, ours, our_params):
    base_dir, finetune_dirs = checkpoints
    merged = _run_mergekit(
        {
            "merge_method": method,
            "base_model": str(base_dir),
            "dtype": "float32",
            "parameters": global_params,
            "models": [
                {"model": str(path), "parameters": {"weight": w, **extra}}
                for path, w, extra in zip(finetune_dirs, WEIGHTS, per_model, strict=True)
            ],
        },
        tmp_path / "merged",
    )
    base = _load(base_dir)
    finetunes = [_load(path) for path in finetune_dirs]
    densities = our_params.get("density", [None] * 3)
    config = parse_merge_config({
        "base": str(base_dir), "merge": ours, "parameters": {k: v for k, v in our_params.items() if k != "density"},
        "models": [{"path": str(p), "lambda": w, **({"density": d} if d else {})}
                   for p, w, d in zip(finetune_dirs, WEIGHTS, densities, strict=True)],
    })
    streamed = _load(merge_llms(config, tmp_path / "ours", progress=False))
    assert set(merged) == set(base) == set(streamed)
    for name, base_tensor in base.items():
        deltas = [ft[name] - base_tensor for ft in finetunes]
        expected = base_tensor + METHODS[ours](deltas, WEIGHTS, our_params)
        assert merged[name].dtype == torch.float32
        assert torch.allclose(merged[name], expected, rtol=0, atol=1e-6), name
        assert torch.allclose(streamed[name], merged[name], rtol=0, atol=1e-6), name
