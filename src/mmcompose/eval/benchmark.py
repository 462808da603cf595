"""Benchmark files: strict loading into :class:`Sample` and scoring of one prediction.

A malformed benchmark silently skews every number computed on it, so loading checks everything it can
(keys, ids, placeholder counts, media files) and fails with one line naming the file and the sample.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmcompose.errors import InputError, MMComposeError
from mmcompose.eval.answers import (
    Similarity,
    extract_choice,
    label_key,
    match_label,
    normalize_vqa,
    parse_options,
)
from mmcompose.eval.captions import caption_scores, normalize_caption

DEFAULT_MODALITIES = ("image", "audio", "video", "point")
"""Modalities whose ``<name>`` placeholder is always counted, even when a sample has no such input."""

TASK_KINDS = ("choice", "open", "label", "caption")
"""``choice``: an option letter (MCUB, AVQA); ``open``: short text, VQA-normalised exact match
(MUSIC-AVQA); ``label``: one class of a closed set (ModelNet40); ``caption``: free text scored against
reference captions with BLEU-4 and ROUGE-L (:mod:`mmcompose.eval.captions`), never right or wrong."""

MCUB_ANSWER_FILE = "MCUB-answer.json"
OFFICIAL_MODALITY_KEYS = {"vision": "image"}
"""Official ModelCompose files key images as ``vision`` (placeholder ``<image>``); read as our ``image``."""


@dataclass(frozen=True)
class Sample:
    """One benchmark question with its inputs and (when known) its gold answer.

    ``question`` is the human turn verbatim, placeholders included, because the model needs them to
    place its inputs; ``options`` are parsed from it (empty for non-choice questions). ``answer`` is the
    gpt turn, or the letter from MCUB's answer file. ``modal_inputs`` paths are joined to ``data_root``
    when the loader was given one, otherwise they are as written in the file. ``references`` are extra
    gold captions from the sample's ``meta.references`` (only ``caption`` tasks use them).
    """

    id: str
    conversations: list[dict[str, str]]
    modal_inputs: dict[str, list[Path]]
    question: str
    answer: str | None
    options: dict[str, str]
    category: str | None = None
    references: tuple[str, ...] = ()


def load_benchmark(
    path: str | Path, data_root: str | Path | None = None, *, modalities: Iterable[str] = DEFAULT_MODALITIES
) -> list[Sample]:
    """Load and validate a benchmark JSON file.

    The file is a list of ``{"id", "conversations": [{"from": "human"|"gpt", "value"}],
    "modal_inputs": {modality: [path, ...]}}`` with an optional ``"category"`` string and an optional
    ``"meta"`` object (free-form, except that ``meta.references``, if present, must be a list of strings:
    more reference captions). Conversations are one human turn, optionally followed by the gpt turn holding
    the gold answer. Each modality's ``<modality>`` placeholder must occur in the human turn exactly as
    often as it has files. With ``data_root``, media paths are resolved against it and must exist; without
    it they stay as written.
    """
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MMComposeError(f"{path}: benchmark file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MMComposeError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(raw, list):
        raise MMComposeError(f"{path}: expected a JSON list of samples, got {type(raw).__name__}")
    if not raw:
        raise MMComposeError(f"{path}: contains no samples")
    root = Path(data_root) if data_root is not None else None
    always = tuple(modalities)
    seen: dict[str, int] = {}
    samples = []
    for index, item in enumerate(raw):
        sample = _parse_sample(item, f"{path}: sample #{index}", root, always)
        if sample.id in seen:
            raise MMComposeError(
                f"{path}: sample #{index}: duplicate id {sample.id!r} (first used by sample #{seen[sample.id]})"
            )
        seen[sample.id] = index
        samples.append(sample)
    return samples


def _parse_sample(item: Any, where: str, root: Path | None, always: tuple[str, ...]) -> Sample:
    if not isinstance(item, dict):
        raise MMComposeError(f"{where}: expected an object, got {type(item).__name__}")
    if "id" in item:
        sample_id = item["id"]
        if isinstance(sample_id, bool) or not isinstance(sample_id, (str, int)) or sample_id == "":
            raise MMComposeError(f"{where}: 'id' must be a non-empty string or an integer, got {sample_id!r}")
        where = f"{where} (id {str(sample_id)!r})"
    for key in ("id", "conversations", "modal_inputs"):
        if key not in item:
            raise MMComposeError(f"{where}: missing key {key!r}")

    conversations = item["conversations"]
    if not isinstance(conversations, list) or len(conversations) not in (1, 2):
        raise MMComposeError(f"{where}: 'conversations' must be a list of one human turn and an optional gpt turn")
    for turn_index, (turn, speaker) in enumerate(zip(conversations, ("human", "gpt"), strict=False)):
        if not isinstance(turn, dict) or turn.get("from") != speaker or not isinstance(turn.get("value"), str):
            raise MMComposeError(
                f"{where}: conversations[{turn_index}] must be {{'from': '{speaker}', 'value': <string>}}"
            )
    question = conversations[0]["value"]

    modal_inputs = item["modal_inputs"]
    if not isinstance(modal_inputs, dict):
        raise MMComposeError(f"{where}: 'modal_inputs' must be an object mapping modality to a list of paths")
    modal_inputs = {OFFICIAL_MODALITY_KEYS.get(m, m): files for m, files in modal_inputs.items()}
    resolved: dict[str, list[Path]] = {}
    for modality, files in modal_inputs.items():
        if not isinstance(files, list) or not all(isinstance(f, str) and f for f in files):
            raise MMComposeError(f"{where}: modal_inputs[{modality!r}] must be a list of paths")
        resolved[modality] = [root / f if root is not None else Path(f) for f in files]
        if root is not None:
            missing = next((f for f in resolved[modality] if not f.is_file()), None)
            if missing is not None:
                raise InputError(f"{where}: {modality} file not found: {missing}")
    for modality in dict.fromkeys((*always, *modal_inputs)):
        count = question.count(f"<{modality}>")
        expected = len(resolved.get(modality, ()))
        if count != expected:
            raise MMComposeError(
                f"{where}: the human turn has {count} <{modality}> placeholder(s) "
                f"but modal_inputs lists {expected} {modality} file(s)"
            )

    category = item.get("category")
    if category is not None and not isinstance(category, str):
        raise MMComposeError(f"{where}: 'category' must be a string, got {category!r}")
    meta = item.get("meta")
    references = meta.get("references", []) if isinstance(meta, dict) else []
    if not isinstance(references, list) or not all(isinstance(r, str) for r in references):
        raise MMComposeError(f"{where}: 'meta.references' must be a list of strings, got {references!r}")
    answer = conversations[1]["value"].strip() if len(conversations) == 2 else None
    return Sample(
        id=str(item["id"]),
        conversations=conversations,
        modal_inputs=resolved,
        question=question,
        answer=answer,
        options=parse_options(question),
        category=category,
        references=tuple(r.strip() for r in references),
    )


_OFFICIAL_MCUB = re.compile(r"MCUB-(?:4|3-(?P<subset>.+))\.json")
_WORLD_MCUB = re.compile(r"mcub(?:4|3_(?P<subset>.+))_test\.json")


def load_mcub(directory: str | Path, data_root: str | Path | None = None) -> dict[str, list[Sample]]:
    """Load every MCUB task in ``directory``, keyed ``MCUB-4`` and ``MCUB-3-<subset>``.

    Two layouts are recognised: the official release (``MCUB-4.json``, ``MCUB-3-<subset>.json`` and
    ``MCUB-answer.json`` mapping id -> letter) and the synthetic world's (``mcub4_test.json``,
    ``mcub3_<subset>_test.json``, gold in the gpt turn). When the answer file is present, samples
    without a gpt turn take their gold letter from it, and a gpt turn that disagrees with it is an error,
    because one of the two is then wrong and the score would be meaningless.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise MMComposeError(f"{directory}: MCUB directory not found")
    files: dict[str, Path] = {}
    for file in sorted(directory.glob("*.json")):
        match = _OFFICIAL_MCUB.fullmatch(file.name) or _WORLD_MCUB.fullmatch(file.name)
        if match is None:
            continue
        task = f"MCUB-3-{match['subset']}" if match["subset"] else "MCUB-4"
        if task in files:
            raise MMComposeError(f"{directory}: both {files[task].name} and {file.name} define task {task}")
        files[task] = file
    if not files:
        raise MMComposeError(
            f"{directory}: no MCUB files (expected MCUB-4.json / MCUB-3-<subset>.json "
            "or mcub4_test.json / mcub3_<subset>_test.json)"
        )
    answer_file = directory / MCUB_ANSWER_FILE
    answers = _load_mcub_answers(answer_file) if answer_file.is_file() else None
    tasks: dict[str, list[Sample]] = {}
    for task in sorted(files, key=lambda t: (t != "MCUB-4", t)):
        samples = load_benchmark(files[task], data_root)
        if answers is not None:
            samples = [_attach_mcub_answer(s, answers, files[task], answer_file) for s in samples]
        for sample in samples:
            if sample.answer is None:
                raise MMComposeError(
                    f"{files[task]}: sample id {sample.id!r} has no gold answer (no gpt turn and no "
                    f"{MCUB_ANSWER_FILE} entry)"
                )
        tasks[task] = samples
    return tasks


def _load_mcub_answers(path: Path) -> dict[str, str]:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MMComposeError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise MMComposeError(f"{path}: expected a JSON object mapping sample id to answer letter")
    answers = {}
    for sample_id, value in raw.items():
        letter = value.strip().strip("().").upper() if isinstance(value, str) else ""
        if len(letter) != 1 or not letter.isalpha():
            raise MMComposeError(f"{path}: id {sample_id!r}: answer {value!r} is not an option letter")
        answers[sample_id] = letter
    return answers


def _attach_mcub_answer(sample: Sample, answers: dict[str, str], file: Path, answer_file: Path) -> Sample:
    letter = answers.get(sample.id)
    if letter is None:
        return sample
    if sample.answer is None:
        return dataclasses.replace(sample, answer=letter)
    own = extract_choice(sample.answer, sample.options or None)
    if own != letter:
        raise MMComposeError(
            f"{file}: sample id {sample.id!r}: gold answer {sample.answer!r} disagrees with "
            f"{answer_file.name} ({letter})"
        )
    return sample


def gold_answer(sample: Sample, kind: str, labels: Sequence[str] | None = None) -> str | list[str]:
    """The canonical gold a prediction is compared to: an option letter, the answer text, a label, or
    for ``caption`` the list of reference captions (the gpt turn, then ``meta.references``; duplicates
    dropped).

    Raises :class:`InputError` naming the sample when the gold is missing or unusable for ``kind``, so a
    run can check every sample before spending time on the model.
    """
    check_kind(kind)
    if kind == "caption":
        return _caption_references(sample)
    if sample.answer is None:
        raise InputError(f"sample {sample.id!r}: no gold answer")
    if kind == "choice":
        letter = extract_choice(sample.answer, sample.options or None)
        if letter is None:
            raise InputError(f"sample {sample.id!r}: gold answer {sample.answer!r} is not an option letter")
        return letter
    if kind == "open":
        if not normalize_vqa(sample.answer):
            raise InputError(f"sample {sample.id!r}: gold answer {sample.answer!r} is empty after normalisation")
        return sample.answer
    if labels is None:
        raise ValueError("kind 'label' needs the list of labels")
    key = label_key(sample.answer)
    for label in labels:
        if label_key(label) == key:
            return label
    raise InputError(f"sample {sample.id!r}: gold label {sample.answer!r} is not one of the {len(labels)} labels")


def _caption_references(sample: Sample) -> list[str]:
    own = [sample.answer] if sample.answer is not None else []
    references = list(dict.fromkeys([*own, *sample.references]))
    if not references:
        raise InputError(f"sample {sample.id!r}: no gold answer (no gpt turn and no meta.references)")
    for reference in references:
        if not normalize_caption(reference):
            raise InputError(f"sample {sample.id!r}: reference caption {reference!r} is empty after normalisation")
    return references


def score(
    sample: Sample,
    prediction: str,
    kind: str,
    *,
    labels: Sequence[str] | None = None,
    similarity: Similarity | None = None,
) -> tuple[str | None, bool]:
    """Parse ``prediction`` for ``kind`` and compare it with the gold: ``(parsed, correct)``.

    ``parsed`` is ``None`` when the prediction cannot be read (which scores as wrong): the chosen letter
    for ``choice``, the VQA-normalised text for ``open``, the matched label for ``label`` (which needs
    ``labels``; ``similarity`` is the optional embedding fallback of :func:`match_label`). A caption is
    never right or wrong: use :func:`score_caption` for ``caption``.
    """
    if kind == "caption":
        raise ValueError("kind 'caption' is scored by score_caption")
    gold = gold_answer(sample, kind, labels)
    if kind == "choice":
        parsed = extract_choice(prediction, sample.options or None)
        return parsed, parsed == gold
    if kind == "open":
        normalized = normalize_vqa(prediction) or None
        return normalized, normalized == normalize_vqa(gold)
    assert labels is not None  # gold_answer has checked it
    label = match_label(prediction, labels, similarity)
    return label, label == gold


def score_caption(sample: Sample, prediction: str) -> tuple[str, dict[str, float]]:
    """Score a free-text caption against the sample's references: ``(normalised prediction, scores)``.

    ``scores`` holds the smoothed sentence ``bleu`` and ``rouge_l`` of
    :func:`~mmcompose.eval.captions.caption_scores`; corpus BLEU-4 needs the whole run (the runner's
    ``summarize``).
    """
    references = gold_answer(sample, "caption")
    return normalize_caption(prediction), caption_scores(prediction, references)


def check_kind(kind: str) -> None:
    """Reject a task kind that is not one of :data:`TASK_KINDS` (it usually comes from the command line)."""
    if kind not in TASK_KINDS:
        raise MMComposeError(f"unknown task kind {kind!r} (expected one of {', '.join(TASK_KINDS)})")
