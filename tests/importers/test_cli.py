"""`mmcompose import ...` and `mmcompose export` from the command line: success and one-line failures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mmcompose.checkpoint import read_manifest
from mmcompose.cli import app
from tests.importers.fixtures import make_clip, make_llava, make_llava_lora, make_modelcompose, make_video_llava_hf
from tests.importers.test_peft import make_adapter
from tests.model.helpers import TINY_ENCODERS

runner = CliRunner()


def run_ok(*args: str) -> str:
    result = runner.invoke(app, [str(arg) for arg in args])
    assert result.exit_code == 0, result.output
    return result.output


def run_bad(*args: str) -> str:
    """The failure must be exit code 2 and exactly one `error: ...` line."""
    result = runner.invoke(app, [str(arg) for arg in args])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


@pytest.mark.parametrize("command", [["import", "modelcompose"], ["import", "llava-hf"], ["import", "peft"],
                                     ["import", "video-llava"], ["import", "llava-lora"], ["export"]])
def test_help(command: list[str]) -> None:
    assert "Usage" in run_ok(*command, "--help")


def test_import_modelcompose(llama_base: Path, tmp_path: Path) -> None:
    make_modelcompose(tmp_path / "official", llama_base, "modal+language", widths={"image": 24, "audio": 16})
    clip = make_clip(tmp_path / "clip")
    audio = tmp_path / "audio.json"
    audio.write_text(json.dumps(TINY_ENCODERS["audio"].model_dump()))
    output = run_ok("import", "modelcompose", tmp_path / "official", "-o", tmp_path / "out", "--base", llama_base,
                    "--encoder", f"image={clip}", "--encoder", f"audio={audio}")
    assert "deltas language->text, image->image, audio->audio" in output and "note: dropped prefix_tokens" in output
    assert "--encoder image=PATH" in run_bad("import", "modelcompose", tmp_path / "official", "-o", tmp_path / "o2",
                                             "--base", llama_base)
    assert "--encoder expects MODALITY=SPEC, got 'image'" in run_bad(
        "import", "modelcompose", tmp_path / "official", "-o", tmp_path / "o2", "--base", llama_base,
        "--encoder", "image")


def test_import_llava_hf_and_export(llama_base: Path, tmp_path: Path) -> None:
    make_llava(tmp_path / "llava", llama_base)
    output = run_ok("import", "llava-hf", tmp_path / "llava", "--base", llama_base, "-o", tmp_path / "image",
                    "--svd-rank", "4")
    assert "deltas shared->text+image" in output and "relative Frobenius error" in output
    assert "not a LLaVA checkpoint" in run_bad("import", "llava-hf", llama_base, "--base", llama_base,
                                               "-o", tmp_path / "bad")
    assert f"exported {tmp_path / 'hf'}" in run_ok("export", tmp_path / "image", "--hf", tmp_path / "hf")
    assert read_manifest(tmp_path / "hf" / "mmcompose").base.path == ".."
    assert "not an mmcompose checkpoint" in run_bad("export", tmp_path / "llava", "--hf", tmp_path / "hf2")


def test_import_peft(llama_base: Path, tmp_path: Path) -> None:
    make_adapter(llama_base, tmp_path / "adapter", r=2, lora_alpha=4, target_modules=["q_proj"])
    output = run_ok("import", "peft", tmp_path / "adapter", "--base", llama_base, "--modality", "image",
                    "-o", tmp_path / "out", "--route", "language")
    assert "deltas language->text" in output and "note: the image branch is new and untrained" in output
    assert "unknown route 'everything'" in run_bad("import", "peft", tmp_path / "adapter", "--base", llama_base,
                                                   "--modality", "image", "-o", tmp_path / "o2", "--route",
                                                   "everything")


def test_import_video_llava_and_llava_lora_then_export_llava_hf(llama_base: Path, tmp_path: Path) -> None:
    make_video_llava_hf(tmp_path / "vl", llama_base)
    output = run_ok("import", "video-llava", tmp_path / "vl", "--base", llama_base, "-o", tmp_path / "video-llava",
                    "--svd-rank", "4")
    assert "modalities image, video; deltas shared->text+image+video" in " ".join(output.split())
    assert "temporal attention is absent" in output and "relative Frobenius error" in output
    line = run_bad("export", tmp_path / "video-llava", "--llava-hf", tmp_path / "hf")
    assert "cannot be exported as a llava-hf LLaVA: it has 2 modalities (image, video)" in line
    assert "--encoder is only for the original layout" in run_bad(
        "import", "video-llava", tmp_path / "vl", "--base", llama_base, "-o", tmp_path / "o2",
        "--encoder", f"image={tmp_path}")
    make_llava_lora(tmp_path / "lora", llama_base)
    clip = make_clip(tmp_path / "clip")
    output = run_ok("import", "llava-lora", tmp_path / "lora", "--base", llama_base, "-o", tmp_path / "image",
                    "--encoder", f"image={clip}")
    assert "deltas shared->text+image" in output
    assert "a LLaVA LoRA release has one modality, image" in run_bad(
        "import", "llava-lora", tmp_path / "lora", "--base", llama_base, "-o", tmp_path / "o3",
        "--encoder", f"video={clip}")
    assert f"exported {tmp_path / 'llava'}" in run_ok("export", tmp_path / "image", "--llava-hf", tmp_path / "llava")
    assert "give exactly one of --hf OUT and --llava-hf OUT" in run_bad("export", tmp_path / "image")
