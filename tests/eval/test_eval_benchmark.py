"""Benchmark loading (strict validation, official MCUB layout) and per-sample scoring."""

import json
import re
from pathlib import Path
from typing import Any

import pytest

from mmcompose.errors import InputError, MMComposeError
from mmcompose.eval.answers import parse_options
from mmcompose.eval.benchmark import Sample, gold_answer, load_benchmark, load_mcub, score

QUESTION = (
    "<image>\n<audio>\n<video>\nWhat do the three entities have in common?\n"
    "A. has wings\nB. lives in the desert\nC. is red\nD. eats fish"
)


def item(sample_id: Any = "q1", answer: str | None = "B", **overrides: Any) -> dict[str, Any]:
    conversations = [{"from": "human", "value": QUESTION}]
    if answer is not None:
        conversations.append({"from": "gpt", "value": answer})
    data = {
        "id": sample_id,
        "conversations": conversations,
        "modal_inputs": {"image": ["img/1.png"], "audio": ["aud/1.wav"], "video": ["vid/1.mp4"]},
    }
    data.update(overrides)
    return data


def write(path: Path, data: Any) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def test_load_benchmark_reads_samples(tmp_path: Path) -> None:
    path = write(tmp_path / "bench.json", [item("q1", category="mcub4"), item(7, answer=None)])
    first, second = load_benchmark(path)
    assert first == Sample(
        id="q1",
        conversations=[{"from": "human", "value": QUESTION}, {"from": "gpt", "value": "B"}],
        modal_inputs={"image": [Path("img/1.png")], "audio": [Path("aud/1.wav")], "video": [Path("vid/1.mp4")]},
        answer="B",
        category="mcub4",
    )
    assert first.question == QUESTION
    assert second.id == "7"
    assert second.answer is None
    assert second.category is None


def test_load_benchmark_resolves_media_under_data_root(tmp_path: Path) -> None:
    for rel in ("img/1.png", "aud/1.wav", "vid/1.mp4"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    (sample,) = load_benchmark(write(tmp_path / "bench.json", [item()]), data_root=tmp_path)
    assert sample.modal_inputs["audio"] == [tmp_path / "aud/1.wav"]


def test_missing_media_file_is_named(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    (tmp_path / "img/1.png").write_bytes(b"x")
    path = write(tmp_path / "bench.json", [item()])
    with pytest.raises(InputError) as info:
        load_benchmark(path, data_root=tmp_path)
    assert str(info.value) == \
        f"{path}: sample #0 (id 'q1'): modal_inputs.audio: audio file not found: {tmp_path / 'aud/1.wav'}"


def _drop(key: str) -> dict[str, Any]:
    data = item("q2")
    del data[key]
    return data


@pytest.mark.parametrize(
    ("second", "message"),
    [
        (_drop("modal_inputs"), "sample #1 (id 'q2'): modal_inputs: missing"),
        (_drop("conversations"), "sample #1 (id 'q2'): conversations: missing"),
        ({k: v for k, v in item().items() if k != "id"}, "sample #1: id: missing"),
        (item("q1"), "sample #1 (id 'q1'): id: duplicate id 'q1' (first used by sample #0)"),
        (item("q2", modal_inputs={"image": "img/1.png"}), "modal_inputs.image: Input should be a valid list"),
        (item("q2", modal_inputs=["img/1.png"]), "(id 'q2'): modal_inputs: Input should be a valid dictionary"),
        (
            item("q2", modal_inputs={"image": ["a.png", "b.png"], "audio": ["1.wav"], "video": ["1.mp4"]}),
            "sample #1 (id 'q2'): conversations: the human turns have 1 <image> placeholder(s) but the sample has 2 "
            "image file(s)",
        ),
        (
            item("q2", modal_inputs={"image": ["a.png"], "audio": ["1.wav"]}),
            "the human turns have 1 <video> placeholder(s) but the sample has 0 video file(s)",
        ),
        (
            item("q2", modal_inputs={"image": ["a.png"], "audio": ["1.wav"], "video": ["1.mp4"], "point": ["p.npy"]}),
            "the human turns have 0 <point> placeholder(s) but the sample has 1 point file(s)",
        ),
        (item("q2", conversations=[{"from": "gpt", "value": "B"}]),
         "conversations: must be one human turn and an optional gpt turn"),
        (item("q2", conversations=[]), "conversations: must be one human turn and an optional gpt turn"),
        (item("q2", conversations=[{"from": "human"}]), "conversations[0].value: missing"),
        (item("q2", category=3), "category: Input should be a valid string"),
        (item(True), "sample #1: id: must be a non-empty string or an integer, got True"),
        ("not an object", "sample #1: expected an object, got str"),
    ],
)
def test_validation_errors_name_file_and_sample(tmp_path: Path, second: Any, message: str) -> None:
    path = write(tmp_path / "bench.json", [item("q1"), second])
    with pytest.raises(MMComposeError) as info:
        load_benchmark(path)
    text = str(info.value)
    assert text.startswith(f"{path}: ")
    assert message in text
    assert "\n" not in text


def test_file_level_errors(tmp_path: Path) -> None:
    with pytest.raises(MMComposeError, match="data file not found"):
        load_benchmark(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("[{", encoding="utf-8")
    with pytest.raises(MMComposeError, match=r"bad\.json: not valid JSON"):
        load_benchmark(tmp_path / "bad.json")
    with pytest.raises(MMComposeError, match="expected a JSON list of samples, got dict"):
        load_benchmark(write(tmp_path / "obj.json", {"id": 1}))
    with pytest.raises(MMComposeError, match="contains no samples"):
        load_benchmark(write(tmp_path / "empty.json", []))


def test_custom_modality_placeholders_are_counted(tmp_path: Path) -> None:
    data = item("d1", modal_inputs={"depth": ["d.png"]})
    data["conversations"][0]["value"] = "<depth> How far is it?"
    (sample,) = load_benchmark(write(tmp_path / "bench.json", [data]))
    assert sample.modal_inputs == {"depth": [Path("d.png")]}


def _mcub_item(sample_id: str, subset: tuple[str, ...], answer: str | None = None) -> dict[str, Any]:
    human = "".join(f"<{m}>\n" for m in subset) + "What do they have in common?\n(A) x (B) y (C) z (D) w"
    conversations = [{"from": "human", "value": human}]
    if answer is not None:
        conversations.append({"from": "gpt", "value": answer})
    return {"id": sample_id, "conversations": conversations, "modal_inputs": {m: [f"{m}/{sample_id}"] for m in subset}}


FOUR = ("image", "audio", "video", "point")
IAV = ("image", "audio", "video")
AVP = ("audio", "video", "point")


def test_load_mcub_official_layout_attaches_answers(tmp_path: Path) -> None:
    write(tmp_path / "MCUB-4.json", [_mcub_item("m1", FOUR), _mcub_item("m2", FOUR)])
    write(tmp_path / "MCUB-3-image-audio-video.json", [_mcub_item("m1", IAV), _mcub_item("m3", IAV, "(C) z")])
    write(tmp_path / "MCUB-3-audio-video-point.json", [_mcub_item("m2", AVP)])
    write(tmp_path / "MCUB-answer.json", {"m1": "A", "m2": "(d)", "m3": "C"})
    write(tmp_path / "unrelated.json", [])
    tasks = load_mcub(tmp_path)
    assert list(tasks) == ["MCUB-4", "MCUB-3-audio-video-point", "MCUB-3-image-audio-video"]
    assert [(s.id, s.answer) for s in tasks["MCUB-4"]] == [("m1", "A"), ("m2", "D")]
    assert [(s.id, s.answer) for s in tasks["MCUB-3-image-audio-video"]] == [("m1", "A"), ("m3", "(C) z")]
    assert [(s.id, s.answer) for s in tasks["MCUB-3-audio-video-point"]] == [("m2", "D")]
    assert parse_options(tasks["MCUB-4"][0].question) == {"A": "x", "B": "y", "C": "z", "D": "w"}


def test_load_mcub_answer_file_disagreeing_with_gpt_turn(tmp_path: Path) -> None:
    path = write(tmp_path / "MCUB-4.json", [_mcub_item("m1", FOUR, "B")])
    write(tmp_path / "MCUB-answer.json", {"m1": "A"})
    with pytest.raises(MMComposeError) as info:
        load_mcub(tmp_path)
    assert str(info.value) == f"{path}: sample id 'm1': gold answer 'B' disagrees with MCUB-answer.json (A)"


def test_load_mcub_missing_gold(tmp_path: Path) -> None:
    path = write(tmp_path / "MCUB-4.json", [_mcub_item("m1", FOUR)])
    with pytest.raises(MMComposeError, match=re.escape(f"{path}: sample id 'm1' has no gold answer")):
        load_mcub(tmp_path)
    write(tmp_path / "MCUB-answer.json", {"m9": "A"})
    with pytest.raises(MMComposeError, match="sample id 'm1' has no gold answer"):
        load_mcub(tmp_path)
    write(tmp_path / "MCUB-answer.json", {"m1": "maybe"})
    with pytest.raises(MMComposeError, match=r"MCUB-answer\.json: id 'm1': answer 'maybe' is not an option letter"):
        load_mcub(tmp_path)


def test_load_mcub_world_layout(tmp_path: Path) -> None:
    write(tmp_path / "mcub4_test.json", [_mcub_item("w1", FOUR, "B")])
    write(tmp_path / "mcub3_image-audio-video_test.json", [_mcub_item("w2", IAV, "D")])
    tasks = load_mcub(tmp_path)
    assert {name: [s.answer for s in samples] for name, samples in tasks.items()} == {
        "MCUB-4": ["B"],
        "MCUB-3-image-audio-video": ["D"],
    }


def test_load_mcub_layout_conflicts_and_empty_dir(tmp_path: Path) -> None:
    with pytest.raises(MMComposeError, match="no MCUB files"):
        load_mcub(tmp_path)
    with pytest.raises(MMComposeError, match="MCUB directory not found"):
        load_mcub(tmp_path / "nope")
    write(tmp_path / "MCUB-4.json", [_mcub_item("m1", FOUR, "B")])
    write(tmp_path / "mcub4_test.json", [_mcub_item("w1", FOUR, "B")])
    with pytest.raises(MMComposeError, match=r"both MCUB-4\.json and mcub4_test\.json define task MCUB-4"):
        load_mcub(tmp_path)


def _sample(answer: str | None, question: str = QUESTION, sample_id: str = "s") -> Sample:
    return Sample(id=sample_id, conversations=[{"from": "human", "value": question}], answer=answer)


def test_score_choice() -> None:
    assert score(_sample("B"), "(B)", "choice") == ("B", True)
    assert score(_sample("B. lives in the desert"), "lives in the desert", "choice") == ("B", True)
    assert score(_sample("C"), "A blorvin is red", "choice") == ("C", True)
    assert score(_sample("A"), "A blorvin is red", "choice") == ("C", False)
    assert score(_sample("A"), "A or B", "choice") == (None, False)


def test_score_open() -> None:
    assert score(_sample("3", "How many?"), "Three.", "open") == ("3", True)
    assert score(_sample("dog", "What?"), "the dog.", "open") == ("dog", True)
    assert score(_sample("2.5", "How long?"), "25", "open") == ("25", False)
    assert score(_sample("yes", "Is it?"), "...", "open") == (None, False)


def test_score_label() -> None:
    labels = ["chair", "night_stand", "table"]
    assert score(_sample("night_stand", "What is it?"), "a nightstand", "label", labels=labels) == (
        "night_stand",
        True,
    )
    assert score(_sample("nightstand", "What is it?"), "Night stand", "label", labels=labels) == (
        "night_stand",
        True,
    )
    assert score(_sample("chair", "What is it?"), "tables", "label", labels=labels) == ("table", False)


def test_gold_answer_errors() -> None:
    with pytest.raises(InputError, match="sample 's': no gold answer"):
        gold_answer(_sample(None), "choice")
    with pytest.raises(InputError, match="sample 's': gold answer 'maybe' is not an option letter"):
        gold_answer(_sample("maybe"), "choice")
    with pytest.raises(InputError, match="gold label 'sofa' is not one of the 2 labels"):
        gold_answer(_sample("sofa"), "label", ["chair", "table"])
    with pytest.raises(MMComposeError, match="unknown task kind 'mcq'"):
        gold_answer(_sample("A"), "mcq")
