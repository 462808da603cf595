"""Benchmark files: strict loading into :class:`~mmcompose.data.Sample` and scoring of one prediction.

A malformed benchmark silently skews every number computed on it, so loading checks everything it can
(keys, ids, placeholder counts, media files) and fails with one line naming the file and the sample.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Collection, Sequence
from pathlib import Path

from mmcompose.data.names import MCUB4, MCUB_ANSWER_FILE, mcub_file_task
from mmcompose.data.samples import Sample, load_samples
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

TASK_KINDS = ("choice", "open", "label", "caption")
"""``choice``: an option letter (MCUB, AVQA); ``open``: short text, VQA-normalised exact match
(MUSIC-AVQA); ``label``: one class of a closed set (ModelNet40); ``caption``: free text scored against
reference captions with BLEU-4 and ROUGE-L (:mod:`mmcompose.eval.captions`), never right or wrong."""


def load_benchmark(path: str | Path, data_root: str | Path | None = None, *,
                   modalities: Collection[str] | None = None) -> list[Sample]:
    """Load and validate a benchmark file with the one sample loader (:func:`mmcompose.data.load_samples`).

    Any of its layouts: ``{id, conversations, modal_inputs: {modality: [path]}}`` (ours and the official
    release's, which keys images ``vision``) or LLaVA's ``image`` key. Conversations are one human turn,
    optionally followed by the gpt turn holding the gold answer; ids are unique; each modality's placeholder
    occurs exactly as often as it has files. With ``data_root``, media paths are resolved against it and
    must exist; without it they stay as written. ``modalities``: the only ones allowed (a model's).
    """
    return load_samples(path, data_root, purpose="eval", modalities=modalities).samples


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
        task = mcub_file_task(file.name)
        if task is None:
            continue
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
    for task in sorted(files, key=lambda t: (t != MCUB4, t)):
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
    own = extract_choice(sample.answer, parse_options(sample.question) or None)
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
        letter = extract_choice(sample.answer, parse_options(sample.question) or None)
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
        parsed = extract_choice(prediction, parse_options(sample.question) or None)
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
