"""The file names and task ids of the synthetic world's data sets and of the official MCUB release.

Every reader and writer of these files takes the names from here: the world builder, the MCUB loader, the
experiment's task list and its report. A task id is the official spelling: ``MCUB-4`` and
``MCUB-3-<subset>``, a subset being its modalities joined by ``-`` in the order of :data:`MCUB3_SUBSETS`
(``MCUB-3-image-audio-video``); a single-modality test's id is the modality's name.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

WORLD_MODALITIES = ("image", "audio", "video", "point")

MCUB3_SUBSETS: tuple[tuple[str, ...], ...] = (
    ("image", "audio", "video"),
    ("image", "audio", "point"),
    ("image", "video", "point"),
    ("audio", "video", "point"),
)
"""The four 3-modality subsets of MCUB-3."""

MCUB_ANSWER_FILE = "MCUB-answer.json"
"""The official release's gold letters: a JSON object mapping sample id to letter."""

TEXT_QA_FILE = "text_qa.json"
DATA_DIR = "data"
SPLITS = ("test", "val")
MCUB4 = "MCUB-4"


def subset_name(modalities: Sequence[str]) -> str:
    """File-name form of a modality subset, e.g. ``image-audio-video``."""
    return "-".join(modalities)


def mcub_subsets() -> list[tuple[str, ...]]:
    """MCUB-4's modalities, then the MCUB-3 subsets: the order of every MCUB task list."""
    return [WORLD_MODALITIES, *MCUB3_SUBSETS]


def mcub_task(modalities: Sequence[str]) -> str:
    """``MCUB-4`` for four modalities, ``MCUB-3-<subset>`` for three."""
    if len(modalities) == 4:
        return MCUB4
    if len(modalities) == 3:
        return f"MCUB-3-{subset_name(modalities)}"
    raise ValueError(f"an MCUB task has three or four modalities, not {list(modalities)}")


MCUB_TASKS = [mcub_task(subset) for subset in mcub_subsets()]


def task_modalities(task: str) -> list[str]:
    """The modalities a task's questions have: an MCUB task's subset, or the single-modality test's own."""
    if task == MCUB4:
        return list(WORLD_MODALITIES)
    if task.startswith("MCUB-3-"):
        return task.removeprefix("MCUB-3-").split("-")
    return [task]


def world_mcub_tag(modalities: Sequence[str]) -> str:
    """``mcub4`` or ``mcub3_<subset>``: how world file names (and the builder's random streams) name a task."""
    return "mcub4" if len(modalities) == 4 else f"mcub3_{subset_name(modalities)}"


def world_mcub_file(modalities: Sequence[str], split: str) -> str:
    """``mcub4_<split>.json`` or ``mcub3_<subset>_<split>.json``: MCUB items with gold in the gpt turn."""
    return f"{world_mcub_tag(modalities)}_{split}.json"


def world_text_mcub_file(modalities: Sequence[str]) -> str:
    """The text-only twin of an MCUB test file: entities named instead of shown."""
    return f"text_{world_mcub_tag(modalities)}_test.json"


def world_mcub_id_prefix(modalities: Sequence[str], split: str) -> str:
    """The prefix of the sample ids in a world MCUB file, e.g. ``mcub3-image-audio-video-test``."""
    return world_mcub_tag(modalities).replace("_", "-") + f"-{split}"


def caption_file(modality: str) -> str:
    return f"{modality}_caption.json"


def instruct_file(modality: str) -> str:
    return f"{modality}_instruct.json"


def single_test_file(modality: str) -> str:
    return f"{modality}_test.json"


def official_mcub_file(modalities: Sequence[str]) -> str:
    """``MCUB-4.json`` / ``MCUB-3-<subset>.json``: the official release's file of a task."""
    return f"{mcub_task(modalities)}.json"


_OFFICIAL_MCUB = re.compile(r"MCUB-(?:4|3-(?P<subset>.+))\.json")
_WORLD_MCUB = re.compile(r"mcub(?:4|3_(?P<subset>.+))_test\.json")


def mcub_file_task(name: str) -> str | None:
    """The task id of an MCUB test file name of either layout, or None for any other file."""
    match = _OFFICIAL_MCUB.fullmatch(name) or _WORLD_MCUB.fullmatch(name)
    if match is None:
        return None
    return f"MCUB-3-{match['subset']}" if match["subset"] else MCUB4


def world_task_files(world: Path, split: str = "test") -> dict[str, Path]:
    """Task id -> file of a world directory: MCUB-4, the MCUB-3 subsets and (test split) the single-modality
    tests, in that order."""
    data = Path(world) / DATA_DIR
    files = {mcub_task(subset): data / world_mcub_file(subset, split) for subset in mcub_subsets()}
    if split == "test":
        files |= {modality: data / single_test_file(modality) for modality in WORLD_MODALITIES}
    return files
