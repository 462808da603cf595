"""The results chart: means over the tasks a method takes, and no bar for a method that takes none."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from mmcompose.experiment.report import panel_means, plot_results


def test_panel_means_skip_tasks_not_taken_and_mark_methods_taking_none() -> None:
    results = {"DAMC": {"image": 0.5, "audio": 0.7, "MCUB-4": 0.4},
               "image-LLM": {"image": 0.8, "audio": None, "MCUB-4": 0.3},
               "tool": {"image": None, "audio": None, "MCUB-4": 0.6}}
    means = panel_means(results, ["image", "audio"])
    assert means["DAMC"] == pytest.approx(60.0) and means["image-LLM"] == pytest.approx(80.0)
    assert means["tool"] is None


def test_plot_writes_a_png(tmp_path: Path) -> None:
    results = {"DAMC": {"image": 0.5, "MCUB-4": 0.4}, "tool": {"image": None, "MCUB-4": 0.6}}
    plot_results(results, {"MCUB": ["MCUB-4"], "single-modality": ["image"]}, tmp_path / "chart.png")
    with Image.open(tmp_path / "chart.png") as image:
        assert image.format == "PNG" and image.width > image.height
