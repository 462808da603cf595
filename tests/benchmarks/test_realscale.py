"""`benchmarks/realscale.py`: the released system's shapes, and a tiny system that loads and answers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from mmcompose.model import MultimodalLLM
from mmcompose.tensorfiles import TensorReader, weight_files

BENCHMARKS = Path(__file__).parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
from realscale import FULL, system_spec  # noqa: E402


def test_the_full_shapes_are_the_released_systems() -> None:
    """Counted on the meta device against the published sizes: LLM 6.74B (6.48B in the 7 target linears),
    deltas 2.56B (4 x r128 + r512 on those linears), encoders and connectors about 0.90B."""
    config = LlamaConfig(**FULL.llm, num_hidden_layers=32, tie_word_embeddings=False)
    with torch.device("meta"):
        llm = LlamaForCausalLM(config)
        model = MultimodalLLM(llm, None, system_spec(FULL), "unused", "sha256:none")
    base = sum(p.numel() for p in llm.parameters() if not any(
        p is q for layer in model.routed.values() for q in layer.deltas.parameters()))
    deltas = sum(p.numel() for layer in model.routed.values() for p in layer.deltas.parameters())
    branches = sum(p.numel() for p in model.branches.parameters())
    assert round(base / 1e9, 2) == 6.74
    assert round(deltas / 1e9, 2) == 2.56
    assert 0.88e9 < branches < 0.92e9
    assert [(d.name, d.rank) for d in model.spec.deltas] == [("language", 512), ("image", 128), ("audio", 128),
                                                            ("video", 128), ("point", 128)]


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("realscale") / "system"
    subprocess.run([sys.executable, str(BENCHMARKS / "realscale.py"), "write", str(out), "--tiny", "--layers", "2",
                    "--shard-gib", "0.0002"], check=True, capture_output=True)
    return out


@pytest.mark.e2e
def test_the_base_is_sharded_as_transformers_writes_it(system: Path) -> None:
    index = json.loads((system / "base" / "model.safetensors.index.json").read_text())
    shards = weight_files(system / "base")
    assert len(shards) > 1 and {p.name for p in shards} == set(index["weight_map"].values())
    with TensorReader(shards) as reader:
        assert set(reader.names()) == set(index["weight_map"])
        assert {dtype for dtype, _ in reader.layout.values()} == {torch.bfloat16}
        assert index["metadata"]["total_size"] == sum(2 * torch.Size(shape).numel() for _, shape in
                                                      reader.layout.values())


@pytest.mark.e2e
def test_the_written_system_loads_and_is_deterministic(system: Path, tmp_path: Path) -> None:
    model = MultimodalLLM.from_pretrained(system / "composed", dtype=torch.bfloat16)
    assert [m.name for m in model.spec.modalities] == ["image", "audio", "video", "point"]
    assert len(model.tokenizer) == model.llm.config.vocab_size
    assert model.llm.lm_head.weight.std() > 0.01
    again = tmp_path / "again"
    subprocess.run([sys.executable, str(BENCHMARKS / "realscale.py"), "write", str(again), "--tiny", "--layers", "2",
                    "--shard-gib", "0.0002"], check=True, capture_output=True)
    files = sorted(str(p.relative_to(system)) for p in system.rglob("*") if p.is_file())
    assert files == sorted(str(p.relative_to(again)) for p in again.rglob("*") if p.is_file())
    for part in files:
        if part != "system.json":  # which records when it was written
            assert (again / part).read_bytes() == (system / part).read_bytes(), part


@pytest.mark.e2e
def test_a_measurement_reports_peak_rss_against_the_model_bytes(system: Path, tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(BENCHMARKS / "realscale.py"), "measure", "fold", str(system),
                           "--scratch", str(tmp_path)], check=True, capture_output=True, text=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["what"] == "fold" and isinstance(result["generated"], str)
    assert result["peak_rss"] > result["baseline_rss"] > 0
    assert 0 <= result["loaded_tensor_bytes"] - result["model_bytes"] < 0.01 * result["model_bytes"]  # + buffers
    assert result["model_bytes"] == sum(p.stat().st_size for p in system.rglob("*.safetensors")) - sum(
        8 + int.from_bytes(p.read_bytes()[:8], "little") for p in system.rglob("*.safetensors"))
