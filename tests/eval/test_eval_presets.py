"""`--benchmark` presets: the official file layouts load with their answer files, and predictions are judged as
the official scripts judge them (first character for MCUB/AVQA, VQA-normalised exact match for MUSIC-AVQA)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmcompose.errors import MMComposeError
from mmcompose.eval.presets import PRESETS, get_preset, load_preset_tasks
from mmcompose.eval.runner import run_benchmark

QUESTION = "<image>\n<audio>\nWhat do they share?\n(A) fur\n(B) wings\n(C) wheels\n(D) leaves"


def _sample(sample_id: str, question: str = QUESTION, modal_inputs: dict | None = None,
            answer: str | None = None) -> dict:
    turns = [{"from": "human", "value": question}] + ([{"from": "gpt", "value": answer}] if answer else [])
    return {"id": sample_id, "conversations": turns,
            "modal_inputs": modal_inputs if modal_inputs is not None else {"vision": ["a.png"], "audio": ["a.wav"]}}


def _write(path: Path, value: object) -> Path:
    path.write_text(json.dumps(value))
    return path


@pytest.fixture
def mcub(tmp_path: Path) -> Path:
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "a.wav").write_bytes(b"")
    _write(tmp_path / "MCUB-4.json", [_sample("q1"), _sample("q2")])
    _write(tmp_path / "MCUB-3-image-audio-video.json", [_sample("q3")])
    _write(tmp_path / "MCUB-answer.json", [_sample(i, answer=a) for i, a in (("q1", "A"), ("q2", "C"), ("q3", "B"))])
    return tmp_path


def test_mcub_directory_loads_every_task_with_official_answers(mcub: Path) -> None:
    tasks = load_preset_tasks(get_preset("mcub"), mcub, None)
    assert {name: [(s.id, s.answer) for s in samples] for name, samples in tasks.items()} == {
        "MCUB-4": [("q1", "A"), ("q2", "C")], "MCUB-3-image-audio-video": [("q3", "B")]}
    assert set(tasks["MCUB-4"][0].modal_inputs) == {"image", "audio"}  # official "vision" is our image


@pytest.mark.parametrize("prediction, parsed, correct", [
    ("A", "A", True), ("  A) fur", "A", True), ("(A) fur", "(", False), ("The answer is A", "T", False),
    ("a", "a", False), ("", None, False),
])
def test_mcub_judges_the_first_character_as_the_official_script(mcub: Path, tmp_path: Path, prediction: str,
                                                                parsed: str | None, correct: bool) -> None:
    preset = get_preset("mcub")
    samples = load_preset_tasks(preset, mcub / "MCUB-4.json", None)["MCUB-4"][:1]
    metrics = run_benchmark(samples, lambda batch: [prediction] * len(batch), tmp_path / "out", "MCUB-4",
                            preset.kind, progress=False, scorer=preset.scorer)
    (record,) = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert (record["parsed"], record["correct"], metrics["accuracy"]) == (parsed, correct, float(correct))


def test_music_avqa_uses_vqa_normalisation(tmp_path: Path) -> None:
    question = "<audio>\nHow many instruments are sounding?"
    (tmp_path / "a.wav").write_bytes(b"")
    _write(tmp_path / "music-avqa-test_mm_audio.json", [_sample("m1", question, {"audio": ["a.wav"]}),
                                                         _sample("m2", question, {"audio": ["a.wav"]})])
    _write(tmp_path / "music-avqa-test_mm_answer.json", [_sample("m1", answer="two"), _sample("m2", answer="Yes")])
    preset = get_preset("music-avqa")
    (samples,) = load_preset_tasks(preset, tmp_path, None).values()
    answers = {"m1": "There are 2 instruments.", "m2": "yes."}
    run_benchmark(samples, lambda batch: [answers[s.id] for s in batch], tmp_path / "out", "audio", preset.kind,
                  progress=False, scorer=preset.scorer)
    records = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert [(r["parsed"], r["correct"]) for r in records] == [("there are 2 instruments", False), ("yes", True)]


def test_avqa_file_finds_its_answer_file_and_missing_answers_are_named(tmp_path: Path) -> None:
    question = "<audio>\nWhat makes the sound?\n(A) a dog\n(B) a car"
    (tmp_path / "a.wav").write_bytes(b"")
    _write(tmp_path / "avqa-test_mm_audio.json", [_sample("v1", question, {"audio": ["a.wav"]}),
                                                   _sample("v2", question, {"audio": ["a.wav"]})])
    _write(tmp_path / "avqa-test_mm_answer.json", {"v1": "B"})
    with pytest.raises(MMComposeError, match=r"avqa-test_mm_audio\.json: sample id 'v2' has no gold answer \(no gpt "
                                             r"turn and no entry in avqa-test_mm_answer\.json\)"):
        load_preset_tasks(get_preset("avqa"), tmp_path / "avqa-test_mm_audio.json", None)
    _write(tmp_path / "avqa-test_mm_answer.json", {"v1": "B", "v2": "A"})
    (samples,) = load_preset_tasks(get_preset("avqa"), tmp_path, None).values()  # the answer file is no task
    assert [s.answer for s in samples] == ["B", "A"]


def test_modelnet40_judges_by_the_gold_class_name_as_the_official_offline_judge(tmp_path: Path) -> None:
    preset = get_preset("modelnet40")
    question = "<point>\nWhat is this?"
    (tmp_path / "p.npy").write_bytes(b"")
    _write(tmp_path / "modelnet40_test.json", [_sample(i, question, {"point": ["p.npy"]}) for i in ("p1", "p2")])
    answers = _write(tmp_path / "labels.json", [{"id": "p1", "label": 26, "label_name": "plant"},
                                                {"id": "p2", "label": 7, "label_name": "car"}])
    (samples,) = load_preset_tasks(preset, tmp_path, None, answers).values()
    outputs = {"p1": "A green Plant in a pot.", "p2": "This is a 3D model of a truck."}
    metrics = run_benchmark(samples, lambda batch: [outputs[s.id] for s in batch], tmp_path / "out", "modelnet40",
                            preset.kind, progress=False, scorer=preset.scorer)
    records = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert [(r["parsed"], r["correct"]) for r in records] == [("plant", True), (None, False)]
    assert metrics["accuracy"] == 0.5


def test_an_unknown_preset_is_one_line() -> None:
    with pytest.raises(MMComposeError, match=r"unknown --benchmark 'scienceqa' \(expected one of mcub, avqa, "
                                             r"music-avqa, modelnet40\)"):
        get_preset("scienceqa")
    assert list(PRESETS) == ["mcub", "avqa", "music-avqa", "modelnet40"]
