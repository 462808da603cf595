"""World file names and task ids: one spelling, and both MCUB layouts map to it."""

from __future__ import annotations

from pathlib import Path

from mmcompose.data import names


def test_task_ids_and_file_names_round_trip() -> None:
    assert names.MCUB_TASKS == ["MCUB-4", "MCUB-3-image-audio-video", "MCUB-3-image-audio-point",
                                "MCUB-3-image-video-point", "MCUB-3-audio-video-point"]
    for subset, task in zip(names.mcub_subsets(), names.MCUB_TASKS, strict=True):
        assert names.task_modalities(task) == list(subset)
        assert names.mcub_file_task(names.world_mcub_file(subset, "test")) == task
        assert names.mcub_file_task(names.official_mcub_file(subset)) == task
        assert names.mcub_file_task(names.world_mcub_file(subset, "val")) is None  # only test files are tasks
    assert names.world_mcub_file(("image", "audio", "video"), "val") == "mcub3_image-audio-video_val.json"
    assert names.world_text_mcub_file(names.WORLD_MODALITIES) == "text_mcub4_test.json"
    assert names.task_modalities("audio") == ["audio"]


def test_world_task_files_are_the_built_files(tmp_path: Path) -> None:
    files = names.world_task_files(tmp_path, "test")
    assert list(files) == [*names.MCUB_TASKS, *names.WORLD_MODALITIES]
    assert files["MCUB-3-audio-video-point"] == tmp_path / "data" / "mcub3_audio-video-point_test.json"
    assert files["point"] == tmp_path / "data" / "point_test.json"
    assert list(names.world_task_files(tmp_path, "val")) == names.MCUB_TASKS
