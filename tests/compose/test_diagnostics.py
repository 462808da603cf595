"""`mmcompose inspect`: delta norms, cosines and sign conflicts against hand-made cases, plot, JSON, CLI.

Known cases are built by editing a saved checkpoint's tensors (negating, copying, overwriting with
patterns), so the expected numbers follow from the edit, not from the code under test.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from PIL import Image
from rich.console import Console
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from mmcompose.checkpoint import save_checkpoint
from mmcompose.cli import app
from mmcompose.compose.diagnostics import (
    InspectionReport,
    inspect_checkpoints,
    plot_report,
    render_table,
    sign_conflict_rate,
)
from mmcompose.errors import CheckpointError, CompositionError
from mmcompose.model import MultimodalLLM
from tests.conftest import make_base
from tests.model.helpers import randomize_deltas, tiny_modality

LAYERS, MODULES = 2, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TENSORS = "model.safetensors"


def _checkpoint(base: Path, out: Path, modality: str = "image", strategy: str = "decoupled", seed: int = 0) -> Path:
    model = MultimodalLLM.from_base(base, [tiny_modality(modality)], strategy=strategy, rank=2, alpha=4)
    randomize_deltas(model, seed=seed, scale=0.2)
    return save_checkpoint(model, out)


def _edited_copy(source: Path, out: Path, change: Callable[[str, torch.Tensor], torch.Tensor]) -> Path:
    shutil.copytree(source, out)
    tensors = load_file(out / TENSORS)
    save_file({name: change(name, tensor) for name, tensor in tensors.items()}, out / TENSORS)
    return out


@pytest.fixture
def image(llama_base: Path, tmp_path: Path) -> Path:
    return _checkpoint(llama_base, tmp_path / "image")


def _values(report: InspectionReport, attribute: str) -> list[float | None]:
    return [getattr(record, attribute) for record in report.records]


# ------------------------------------------------------------------------------------------ measures


def test_sign_conflict_rate_hand_cases() -> None:
    # b is zero at index 2, so only indices 0, 1, 3 count; they disagree at index 1 only.
    assert sign_conflict_rate([torch.tensor([1.0, 1, 1, 1]), torch.tensor([1.0, -1, 0, 2])]) == pytest.approx(1 / 3)
    # Index 0: a+ b- (conflict); 1 and 3: one non-zero input (not counted); 2: b+ c+ (agree).
    three = [torch.tensor([1.0, 1, 0, 0]), torch.tensor([-1.0, 0, 1, 0]), torch.tensor([0.0, 0, 2, 5])]
    assert sign_conflict_rate(three) == pytest.approx(1 / 2)
    # 1e-9 is below eps * max|a| = 1e-6, so it is a zero, not a negative... unless eps is 0.
    tiny = [torch.tensor([1.0, -1e-9]), torch.tensor([1.0, 1.0])]
    assert sign_conflict_rate(tiny) == 0.0
    assert sign_conflict_rate(tiny, eps=0.0) == pytest.approx(1 / 2)
    assert sign_conflict_rate([torch.zeros(3), torch.ones(3)]) is None


def test_identical_and_negated_checkpoints(image: Path, tmp_path: Path) -> None:
    same = _edited_copy(image, tmp_path / "same", lambda name, t: t)
    negated = _edited_copy(image, tmp_path / "negated", lambda name, t: -t if name.endswith("lora_B") else t)

    identical = inspect_checkpoints([image, same])
    assert len(identical.records) == LAYERS * len(MODULES) * 2
    assert all(c == pytest.approx(1.0, abs=1e-5) for c in _values(identical, "mean_cosine"))
    assert all(rate == 0.0 for rate in _values(identical, "sign_conflict"))

    opposite = inspect_checkpoints([image, negated])
    assert all(c == pytest.approx(-1.0, abs=1e-5) for c in _values(opposite, "mean_cosine"))
    assert all(rate == 1.0 for rate in _values(opposite, "sign_conflict"))
    for record in opposite.records:
        first, second = record.norms.values()
        assert first == pytest.approx(second) and first > 0
    assert [(r.group, r.layer, r.module) for r in opposite.records[:3]] == [
        ("language", 0, "q_proj"), ("modality", 0, "q_proj"), ("language", 0, "k_proj")]
    assert {(row.group, row.module): row.mean_cosine for row in opposite.summary}[("modality", "down_proj")] \
        == pytest.approx(-1.0, abs=1e-5)


def test_norms_are_those_of_the_lora_products(image: Path) -> None:
    report = inspect_checkpoints([image])
    tensors = load_file(image / TENSORS)
    path = "model.layers.1.mlp.up_proj"
    for delta, group in (("language", "language"), ("image", "modality")):
        a, b = tensors[f"deltas.{delta}.{path}.lora_A"], tensors[f"deltas.{delta}.{path}.lora_B"]
        expected = torch.linalg.matrix_norm((4 / 2) * b @ a).item()  # alpha / rank = 4 / 2
        record = next(r for r in report.records if r.path == path and r.group == group)
        assert record.layer == 1 and record.module == "up_proj"
        assert record.norms == {f"image/{delta}": pytest.approx(expected, rel=1e-5)}
        assert record.cosines == [] and record.sign_conflict is None


def test_dense_deltas_with_zeros(llama_base: Path, tmp_path: Path) -> None:
    full = _checkpoint(llama_base, tmp_path / "full", strategy="full")

    def fill(values: torch.Tensor) -> Callable[[str, torch.Tensor], torch.Tensor]:
        return lambda name, t: values.repeat(t.numel() // len(values)).reshape(t.shape) \
            if name.startswith("deltas.") else t

    ones = _edited_copy(full, tmp_path / "all-ones", fill(torch.ones(1)))
    # Repeating 1, -1, 0, 1e-9 against all ones: 1e-9 is below eps * max, so only the first two positions
    # of each four have two non-zero inputs, and one of those two disagrees; the dot product is ~0.
    mixed = _edited_copy(full, tmp_path / "mixed", fill(torch.tensor([1.0, -1.0, 0.0, 1e-9])))
    report = inspect_checkpoints([ones, mixed])
    assert all(item.groups == ("language", "modality") for item in report.inputs)
    for record in report.records:
        numel = record.norms["all-ones/full"] ** 2
        assert record.norms["mixed/full"] == pytest.approx((numel / 2) ** 0.5, rel=1e-5)
        assert record.mean_cosine == pytest.approx(0.0, abs=1e-6)
        assert record.sign_conflict == pytest.approx(0.5)


def test_shared_delta_counts_in_both_groups(llama_base: Path, image: Path, tmp_path: Path) -> None:
    shared = _checkpoint(llama_base, tmp_path / "audio", "audio", strategy="shared", seed=3)
    report = inspect_checkpoints([image, shared])
    assert [i.label for i in report.inputs_in("language")] == ["image/language", "audio/shared"]
    assert [i.label for i in report.inputs_in("modality")] == ["image/image", "audio/shared"]
    console = Console(record=True, width=200)
    console.print(render_table(report))
    text = console.export_text()
    assert "norm image" in text and "norm audio" in text and "shared" in text and "gate_proj" in text


def test_checkpoints_with_the_same_name_are_told_apart_by_their_run_directory(image: Path, tmp_path: Path) -> None:
    first = shutil.copytree(image, tmp_path / "runs" / "a" / "model")
    second = shutil.copytree(image, tmp_path / "runs" / "b" / "model")
    assert list(inspect_checkpoints([first, second]).checkpoints) == ["a/model", "b/model"]
    assert list(inspect_checkpoints([first, first]).checkpoints) == ["1:model", "2:model"]


# --------------------------------------------------------------------------------------------- refusals


def test_different_bases_are_refused(image: Path, tmp_path: Path) -> None:
    other = _checkpoint(make_base(tmp_path / "other-base", seed=1), tmp_path / "other", "audio")
    with pytest.raises(CompositionError, match="were trained on different base LLMs"):
        inspect_checkpoints([image, other])


def test_malformed_delta_tensors_are_refused(image: Path, tmp_path: Path) -> None:
    shutil.copytree(image, tmp_path / "broken")
    tensors = load_file(tmp_path / "broken" / TENSORS)
    del tensors["deltas.image.model.layers.0.self_attn.q_proj.lora_B"]
    save_file(tensors, tmp_path / "broken" / TENSORS)
    with pytest.raises(CheckpointError, match=r"delta 'image' at model\.layers\.0\.self_attn\.q_proj has tensors"):
        inspect_checkpoints([tmp_path / "broken"])


# ------------------------------------------------------------------------------------------ plot and CLI


def test_plot_is_a_png_written_atomically(image: Path, tmp_path: Path) -> None:
    negated = _edited_copy(image, tmp_path / "negated", lambda name, t: -t if name.endswith("lora_B") else t)
    target = plot_report(inspect_checkpoints([image, negated]), tmp_path / "plots" / "interference.png")
    with Image.open(target) as picture:
        picture.verify()
    with Image.open(target) as picture:
        assert picture.format == "PNG" and picture.width > 0 and picture.height > 0
    assert [p.name for p in target.parent.iterdir()] == ["interference.png"]


def test_cli_inspect(llama_base: Path, image: Path, tmp_path: Path) -> None:
    other = _checkpoint(llama_base, tmp_path / "audio", "audio", seed=5)
    runner = CliRunner()
    result = runner.invoke(app, ["inspect", str(image), str(other), "--json", str(tmp_path / "r.json"),
                                 "--plot", str(tmp_path / "r.png")])
    assert result.exit_code == 0, result.output
    assert "q_proj" in result.stdout and "sign conflict" in result.stdout
    data = json.loads((tmp_path / "r.json").read_text())
    assert len(data["records"]) == LAYERS * len(MODULES) * 2
    assert {"group", "layer", "module", "norms", "cosines", "sign_conflict", "mean_cosine"} <= data["records"][0].keys()
    assert (tmp_path / "r.png").stat().st_size > 0

    missing = runner.invoke(app, ["inspect", str(tmp_path / "nowhere")])
    assert missing.exit_code == 2
    assert missing.stderr.count("\n") == 1 and missing.stderr.startswith("error:")
    assert "not an mmcompose checkpoint" in missing.stderr
    wrong_suffix = runner.invoke(app, ["inspect", str(image), "--plot", str(tmp_path / "r.jpg")])
    assert wrong_suffix.exit_code == 2 and "ending in .png" in wrong_suffix.stderr
