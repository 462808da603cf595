"""`mmcompose merge`: full fine-tunes of one LLM into one, sharded output that transformers loads, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import LlamaConfig, LlamaForCausalLM
from typer.testing import CliRunner

from mmcompose.cli import app
from mmcompose.compose.llm_merge import parse_size, plan_shards
from mmcompose.errors import CompositionError


@pytest.fixture(scope="module")
def llms(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    """A float32 LLaMA base (~60 KB of weights) and two fine-tunes of it."""
    root = tmp_path_factory.mktemp("llms")
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=64, max_position_embeddings=64, tie_word_embeddings=False)
    base = LlamaForCausalLM(config)
    base.save_pretrained(root / "base")
    tuned = []
    for i in range(2):
        model = LlamaForCausalLM(config)
        with torch.no_grad():
            for param, reference in zip(model.parameters(), base.parameters(), strict=True):
                param.copy_(reference + 0.01 * torch.randn_like(reference))
        model.save_pretrained(root / f"ft{i}")
        tuned.append(root / f"ft{i}")
    return root / "base", tuned


def _write_config(path: Path, base: Path, tuned: list[Path], merge: str = "linear") -> Path:
    path.write_text(f"base: {base}\nmerge: {merge}\nmodels:\n"
                    f"  - {{path: {tuned[0]}, lambda: 0.75}}\n  - {{path: {tuned[1]}, lambda: 0.25}}\n")
    return path


def test_sharded_merge_loads_with_from_pretrained(llms: tuple[Path, list[Path]], tmp_path: Path) -> None:
    base, tuned = llms
    config = _write_config(tmp_path / "merge.yaml", base, tuned)
    runner = CliRunner()
    result = runner.invoke(app, ["merge", str(config), "-o", str(tmp_path / "sharded"), "--max-shard-size", "10KB"])
    assert result.exit_code == 0, result.output
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    shards = sorted((tmp_path / "sharded").glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and set(index["weight_map"].values()) == {shard.name for shard in shards}
    for shard in shards:  # every shard within the limit unless it holds one tensor that alone exceeds it
        with safe_open(str(shard), "pt") as handle:
            sizes = [handle.get_tensor(name).nbytes for name in handle.keys()]  # noqa: SIM118
        assert sum(sizes) <= 10_000 or len(sizes) == 1
    assert not list(tmp_path.glob(".sharded.tmp-*"))

    merged = LlamaForCausalLM.from_pretrained(tmp_path / "sharded").state_dict()
    references = [LlamaForCausalLM.from_pretrained(path).state_dict() for path in (base, *tuned)]
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in references[0].values())
    for name, original in references[0].items():  # base + 0.75 * (ft0 - base) + 0.25 * (ft1 - base)
        expected = original + 0.75 * (references[1][name] - original) + 0.25 * (references[2][name] - original)
        torch.testing.assert_close(merged[name], expected, rtol=0, atol=1e-6)

    whole = runner.invoke(app, ["merge", str(config), "-o", str(tmp_path / "whole")])
    assert whole.exit_code == 0, whole.output
    assert sorted(p.name for p in (tmp_path / "whole").iterdir()) == ["config.json", "generation_config.json",
                                                                       "model.safetensors"]
    unsharded = LlamaForCausalLM.from_pretrained(tmp_path / "whole").state_dict()
    assert all(torch.equal(unsharded[name], merged[name]) for name in merged)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda text: text.replace("merge: linear", "merge: factorwise_mean"), "needs LoRA inputs"),
        (lambda text: text.replace("merge: linear", "merge: ties"), "merge method 'ties' needs parameter 'density'"),
        (lambda text: text.replace("base:", "method: naive\nbase:"), "method: unknown key"),
        (lambda text: text.replace("lambda: 0.25", "lambda: -1"), "lambda must be finite and >= 0"),
    ],
)
def test_bad_merge_configs_fail_in_one_line(llms: tuple[Path, list[Path]], tmp_path: Path, edit, message: str) -> None:
    base, tuned = llms
    config = _write_config(tmp_path / "merge.yaml", base, tuned)
    config.write_text(edit(config.read_text()))
    result = CliRunner().invoke(app, ["merge", str(config), "-o", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert len(result.output.strip().splitlines()) == 1 and message in result.output, result.output
    assert not (tmp_path / "out").exists()


def test_shard_sizes_and_plan() -> None:
    assert [parse_size(s) for s in ("5GB", "500MB", "2GiB", "10kb", 123)] == [5 * 10**9, 5 * 10**8, 2 * 2**30,
                                                                               10**4, 123]
    for bad in ("five", "0", "-1GB", "1PB"):
        with pytest.raises(CompositionError, match="shard size"):
            parse_size(bad)
    layout = {"a": (torch.float32, (10,)), "b": (torch.float32, (30,)), "c": (torch.float32, (5,))}
    # 40, 120 and 20 bytes under a 100-byte limit: b is alone and over the limit, c starts a new shard
    assert [list(shard) for shard in plan_shards(layout, 100)] == [["a"], ["b"], ["c"]]
    assert [list(shard) for shard in plan_shards(layout, 160)] == [["a", "b"], ["c"]]
