"""Every file the world's task list names exists in a built world and loads with the one sample loader."""

from __future__ import annotations

from pathlib import Path

from mmcompose.data import load_samples, names


def test_every_task_file_exists_and_validates(small_world: Path) -> None:
    for split in names.SPLITS:
        for task, path in names.world_task_files(small_world, split).items():
            samples = load_samples(path, small_world, modalities=names.task_modalities(task)).samples
            assert samples and all(set(s.modal_inputs) == set(names.task_modalities(task)) for s in samples)
    for modality in names.WORLD_MODALITIES:
        for file in (names.caption_file(modality), names.instruct_file(modality)):
            loaded = load_samples(small_world / names.DATA_DIR / file, small_world, purpose="train",
                                  modalities=[modality])
            assert loaded.samples and not loaded.skipped
    assert (small_world / names.DATA_DIR / names.TEXT_QA_FILE).is_file()
