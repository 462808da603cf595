"""`mmcompose compose` from the command line: success and one-line failures."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from mmcompose.checkpoint import save_checkpoint
from mmcompose.cli import app
from mmcompose.model import MultimodalLLM
from tests.model.helpers import randomize_deltas, tiny_modality


def test_compose_command(llama_base: Path, tmp_path: Path) -> None:
    paths = []
    for modality in ("image", "point"):
        model = MultimodalLLM.from_base(llama_base, [tiny_modality(modality)], strategy="decoupled", rank=2, alpha=4)
        randomize_deltas(model)
        paths.append(save_checkpoint(model, tmp_path / modality))
    config = tmp_path / "compose.yaml"
    config.write_text("method: damc\nmerge: ties\nparameters: {density: 0.5}\nmodels:\n"
                      + "".join(f"  - path: {p}\n" for p in paths))
    runner = CliRunner()
    result = runner.invoke(app, ["compose", str(config), "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "composed" in result.output and (tmp_path / "out" / "manifest.json").is_file()
    again = runner.invoke(app, ["compose", str(config), "-o", str(tmp_path / "out")])
    assert again.exit_code == 2
    assert again.output.strip().splitlines() == [f"error: {tmp_path / 'out'} already exists (choose another path "
                                                 "or pass --overwrite)"]
    config.write_text("method: damc\nmodels:\n  - {path: nowhere}\n")
    missing = runner.invoke(app, ["compose", str(config), "-o", str(tmp_path / "other")])
    assert missing.exit_code == 2 and "nowhere: not an mmcompose checkpoint" in missing.output
    assert len(missing.output.strip().splitlines()) == 1
    removed = runner.invoke(app, ["compose", "--from", str(tmp_path / "out"), "--remove", "point",
                                  "-o", str(tmp_path / "image-only")])
    assert removed.exit_code == 0, removed.output
    both = runner.invoke(app, ["compose", str(config), "--from", str(tmp_path / "out"), "-o", str(tmp_path / "x")])
    assert both.exit_code == 2 and "give either a CONFIG file or --from" in both.output
