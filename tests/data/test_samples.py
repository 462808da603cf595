"""The one sample loader: our, the official ModelCompose and LLaVA's layouts, and bad input, one line each."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmcompose.data import BadSample, load_files, load_samples, validate_records
from mmcompose.data import samples as samples_module
from mmcompose.data.samples import StoredSamples, iter_records, stream_samples
from mmcompose.errors import InputError
from tests.data.media import turns, write_json, write_png, write_wav


@pytest.fixture
def root(tmp_path: Path) -> Path:
    write_png(tmp_path / "img" / "a.png", 0)
    write_png(tmp_path / "img" / "b.png", 1)
    write_wav(tmp_path / "aud" / "a.wav", 2)
    return tmp_path


def test_our_layout(root: Path) -> None:
    path = write_json(root / "ours.json", [
        {"id": 1, "conversations": turns("<image>\n<audio>\nSame?", "yes"),
         "modal_inputs": {"image": ["img/a.png"], "audio": ["aud/a.wav"]}, "category": "pair"},
    ])
    (sample,) = load_samples(path, root, purpose="train").samples
    assert sample.id == "1" and sample.answer == "yes" and sample.category == "pair"
    assert sample.modal_inputs == {"image": [root / "img/a.png"], "audio": [root / "aud/a.wav"]}


def test_official_layout_reads_vision_as_image_and_letter_gold(root: Path) -> None:
    # As the official release writes them: modal_inputs keyed vision|audio|video|point, images as <image>.
    path = write_json(root / "MCUB-3-x.json", [
        {"id": "q0", "conversations": turns("<image>\n<audio>\nWhich?\n(A) x (B) y", "B"),
         "modal_inputs": {"vision": ["img/a.png"], "audio": ["aud/a.wav"]}},
    ])
    (sample,) = load_samples(path, root).samples
    assert sample.modal_inputs == {"image": [root / "img/a.png"], "audio": [root / "aud/a.wav"]}
    assert sample.answer == "B"
    both = write_json(root / "both.json", [{"id": "q", "conversations": turns("<image>", "B"),
                                            "modal_inputs": {"vision": ["img/a.png"], "image": ["img/b.png"]}}])
    with pytest.raises(InputError, match=r"sample #0 \(id 'q'\): modal_inputs: both 'image' and another key"):
        load_samples(both, root)


def test_llava_layout_multi_turn_and_text_only(root: Path) -> None:
    path = write_json(root / "llava.json", [
        {"id": "000001", "image": "img/a.png", "model": "ignored",
         "conversations": turns("<image>\nWhat is it?", "A square.", "And its colour?", "Noise.")},
        {"id": "000002", "conversations": turns("Say hi.", "Hi.")},
    ])
    first, second = load_samples(path, root, purpose="train").samples
    assert first.modal_inputs == {"image": [root / "img/a.png"]} and first.answer == "Noise."
    assert len(first.conversations) == 4
    assert second.modal_inputs == {}
    no_token = write_json(root / "bad_llava.json", [{"id": "x", "image": "img/a.png",
                                                     "conversations": turns("What is it?", "A square.")}])
    with pytest.raises(InputError, match=r"bad_llava\.json: sample #0 \(id 'x'\): conversations: the human turns "
                                         r"have 0 <image> placeholder\(s\) but the sample has 1 image file\(s\)"):
        load_samples(no_token, root, purpose="train")


def test_layout_is_detected_per_file_and_jsonl_is_read(root: Path) -> None:
    ours = write_json(root / "a.json", [{"id": "a", "conversations": turns("<image>", "x"),
                                         "modal_inputs": {"image": ["img/a.png"]}}])
    llava = root / "b.jsonl"
    llava.write_text("\n".join(json.dumps({"id": f"b{i}", "image": "img/b.png",
                                           "conversations": turns("<image>", "y")}) for i in range(2)) + "\n")
    loaded = load_files([ours, llava], root, purpose="train")
    assert [s.id for s in loaded.samples] == ["a", "b0", "b1"]
    assert loaded.samples[2].modal_inputs == {"image": [root / "img/b.png"]}


BAD = [
    ({"id": "m", "conversations": turns("<image>", "x"), "modal_inputs": {"image": ["img/none.png"]}},
     "modal_inputs.image: image file not found: {root}/img/none.png"),
    ({"id": "d", "conversations": turns("<depth>", "x"), "modal_inputs": {"depth": ["img/a.png"]}},
     "modal_inputs.depth: modality 'depth', which the model does not have (it has: image, audio)"),
    ({"id": "t", "conversations": [{"from": "gpt", "value": "x"}], "modal_inputs": {}},
     "conversations: must alternate human and gpt turns"),
    ({"id": "u", "conversations": turns("hi"), "modal_inputs": {}}, "conversations: must alternate"),
    ({"id": "s", "conversations": [{"from": "system", "value": "x"}], "modal_inputs": {}},
     "conversations[0].from: Input should be 'human' or 'gpt'"),
    ({"id": "v", "conversations": [{"from": "human"}, {"from": "gpt", "value": "x"}], "modal_inputs": {}},
     "conversations[0].value: missing"),
    ({"id": "p", "conversations": turns("<image><image>", "x"), "modal_inputs": {"image": ["img/a.png"]}},
     "conversations: the human turns have 2 <image> placeholder(s) but the sample has 1 image file(s)"),
    ({"conversations": turns("hi", "x"), "modal_inputs": {}}, "id: missing"),
]


@pytest.mark.parametrize(("record", "message"), BAD)
def test_each_bad_sample_is_one_line_naming_file_index_and_field(root: Path, record: dict, message: str) -> None:
    good = {"id": "g", "conversations": turns("<image>", "x"), "modal_inputs": {"image": ["img/a.png"]}}
    path = write_json(root / "train.json", [good, record])
    with pytest.raises(InputError) as info:
        load_samples(path, root, purpose="train", modalities=["image", "audio"])
    text = str(info.value)
    assert text.startswith(f"{path}: sample #1") and "\n" not in text
    assert message.format(root=root) in text


def test_skip_reports_every_bad_sample_and_stop_names_them_all(root: Path) -> None:
    records = [{"id": str(i), "conversations": turns("<image>", "x"), "modal_inputs": {"image": [f"img/{n}.png"]}}
               for i, n in enumerate(["a", "gone", "b", "lost"])]
    skipped = validate_records(records, "f.json", root, purpose="train", on_bad_sample="skip")
    assert [s.id for s in skipped.samples] == ["0", "2"]
    assert [(b.file, b.index, b.field, b.id) for b in skipped.skipped] == \
        [("f.json", 1, "modal_inputs.image", "1"), ("f.json", 3, "modal_inputs.image", "3")]
    assert all(isinstance(b, BadSample) for b in skipped.skipped)
    with pytest.raises(InputError, match=r"^f\.json: sample #1 \(id '1'\): .* \(and 1 more bad sample\(s\): "
                                         r"f\.json: sample #3 \(id '3'\)"):
        validate_records(records, "f.json", root, purpose="train")
    with pytest.raises(InputError, match=r"f\.json: no valid samples \(4 skipped\)"):
        validate_records(records[1:2] * 4, "f.json", root, purpose="train", on_bad_sample="skip")


def test_file_level_bad_input(root: Path) -> None:
    with pytest.raises(InputError, match="contains no samples"):
        load_samples(write_json(root / "empty.json", []))
    (root / "blank.jsonl").write_text("\n")
    with pytest.raises(InputError, match="contains no samples"):
        load_samples(root / "blank.jsonl")
    (root / "broken.json").write_text("[{")
    with pytest.raises(InputError, match=r"broken\.json: not valid JSON"):
        load_samples(root / "broken.json")
    with pytest.raises(InputError, match="data file not found"):
        load_samples(root / "nothing.json")
    with pytest.raises(InputError, match="on_bad_sample 'ignore'"):
        validate_records([{}], "x", on_bad_sample="ignore")  # type: ignore[arg-type]


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_streamed_records_and_their_offsets(root: Path, suffix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Records are read item by item across read boundaries (a 64-byte read here), non-ASCII text and numbers
    at a boundary included; each offset and size cut exactly that record out of the file's bytes."""
    monkeypatch.setattr(samples_module, "STREAM_CHUNK", 64)
    records = [{"id": i, "text": "héllo ☃ " * (i % 5), "n": 12345678901234 + i} for i in range(40)]
    records += [1234567, "ü", None, [1, 2]]
    path = root / f"many{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(records, indent=1, ensure_ascii=False), encoding="utf-8")
    else:
        path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n\n", encoding="utf-8")
    found = list(iter_records(path))
    raw = path.read_bytes()
    assert [r for r, _, _ in found] == records
    assert [json.loads(raw[offset:offset + size]) for _, offset, size in found] == records


def test_streamed_samples_match_the_eager_loader(root: Path) -> None:
    records = [{"id": i, "conversations": turns("<image>\nWhat? " + "é" * i, f"answer {i}"),
                "modal_inputs": {"image": [f"img/{i % 2}.png"]}} for i in range(6)]
    records[2]["modal_inputs"] = {"image": ["img/missing.png"]}
    path = write_json(root / "s.json", records)
    for k in range(2):
        write_png(root / "img" / f"{k}.png", k)
    eager = load_files([path], root, purpose="train", on_bad_sample="skip")
    streamed = stream_samples([path], root, purpose="train", on_bad_sample="skip")
    assert isinstance(streamed.samples, StoredSamples) and len(streamed.samples) == 5
    assert list(streamed.samples) == eager.samples and streamed.samples[4] == eager.samples[4]
    assert [str(b) for b in streamed.skipped] == [str(b) for b in eager.skipped]
    assert streamed.samples[2].origin == (str(path), 3)
    with pytest.raises(InputError, match=r"s\.json: sample #2 \(id '2'\): modal_inputs.image: image file not found"):
        stream_samples([path], root, purpose="train")
    broken = root / "broken.json"
    broken.write_text('[{"id": 1}, {"id": ]')
    with pytest.raises(InputError, match=r"broken\.json: not valid JSON \(Expecting value: line 1 column 20"):
        stream_samples([broken], root, purpose="train")
    path.write_text(json.dumps([{"id": "changed"}] * 6))  # the file changes after loading
    with pytest.raises(InputError, match=r"s\.json: sample #0.*the file changed after it was loaded"):
        streamed.samples[0]
