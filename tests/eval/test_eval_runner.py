"""The runner: per-sample JSONL, resume after a kill, shards + merge, failed samples, metrics."""

import functools
import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from mmcompose.errors import InputError, MMComposeError
from mmcompose.eval.benchmark import Sample
from mmcompose.eval.runner import merge_shards, run_benchmark, shard_files
from tests.eval.fakes import ScriptedModel, ask, read_lines

QUESTION = "<image><audio><video> Shared?\nA. has wings\nB. lives in the desert\nC. is red\nD. eats fish"

# id -> (gold, category, what the fake model says); None = the model raises InputError
CASES: dict[str, tuple[str, str, str | None]] = {
    "s0": ("B", "mcub4", "(B)"),  # correct
    "s1": ("C", "mcub4", "The answer is c."),  # correct
    "s2": ("A", "mcub4", "lives in the desert"),  # parsed B, wrong
    "s3": ("D", "mcub3", "A or B"),  # unparseable
    "s4": ("A", "mcub3", None),  # failed
    "s5": ("C", "mcub3", "C. is red"),  # correct
}


def make_samples() -> list[Sample]:
    return [
        ask(sid, QUESTION, gold, category)
        for sid, (gold, category, _) in CASES.items()
    ]


FakeModel = functools.partial(ScriptedModel, {sid: answer for sid, (_, _, answer) in CASES.items()},
                              "audio file is\nnot decodable")


EXPECTED_METRICS = {
    "task": "MCUB-4",
    "kind": "choice",
    "n": 6,
    "n_correct": 3,
    "accuracy": 0.5,
    "n_unparseable": 1,
    "n_failed": 1,
    "categories": {
        "mcub3": {"n": 3, "n_correct": 1, "accuracy": 1 / 3},
        "mcub4": {"n": 3, "n_correct": 2, "accuracy": 2 / 3},
    },
}


def test_run_writes_records_and_metrics(tmp_path: Path) -> None:
    model = FakeModel()
    metrics = run_benchmark(make_samples(), model, tmp_path, "MCUB-4", "choice", progress=False)
    assert metrics == EXPECTED_METRICS
    assert json.loads((tmp_path / "metrics.json").read_text()) == EXPECTED_METRICS
    records = read_lines(tmp_path / "predictions.jsonl")
    assert [(r["id"], r["parsed"], r["correct"]) for r in records] == [
        ("s0", "B", True),
        ("s1", "C", True),
        ("s2", "B", False),
        ("s3", None, False),
        ("s4", None, False),
        ("s5", "C", True),
    ]
    assert records[0] == {
        "id": "s0",
        "index": 0,
        "category": "mcub4",
        "prompt": QUESTION,
        "prediction": "(B)",
        "gold": "B",
        "parsed": "B",
        "correct": True,
        "error": None,
    }
    # the failed sample is recorded with its one-line message, and the samples after it still ran
    assert records[4]["error"] == "sample 's4': audio file is not decodable"
    assert records[4]["prediction"] is None
    assert model.calls == Counter({sid: 1 for sid in CASES})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json", "predictions.jsonl"]


def test_resume_after_kill_does_not_redo_finished_samples(tmp_path: Path) -> None:
    killed = FakeModel(kill_after=3)
    with pytest.raises(KeyboardInterrupt):
        run_benchmark(make_samples(), killed, tmp_path, "MCUB-4", "choice", progress=False)
    assert [r["id"] for r in read_lines(tmp_path / "predictions.jsonl")] == ["s0", "s1", "s2"]
    assert not (tmp_path / "metrics.json").exists()

    resumed = FakeModel()
    metrics = run_benchmark(make_samples(), resumed, tmp_path, "MCUB-4", "choice", progress=False)
    assert resumed.calls == Counter({"s3": 1, "s4": 1, "s5": 1})
    assert metrics == EXPECTED_METRICS
    assert [r["id"] for r in read_lines(tmp_path / "predictions.jsonl")] == list(CASES)

    again = FakeModel()
    assert run_benchmark(make_samples(), again, tmp_path, "MCUB-4", "choice", progress=False) == EXPECTED_METRICS
    assert again.calls == Counter()


def test_resume_ignores_a_torn_last_line(tmp_path: Path) -> None:
    run_benchmark(make_samples(), FakeModel(), tmp_path, "MCUB-4", "choice", progress=False)
    path = tmp_path / "predictions.jsonl"
    data = path.read_bytes()
    path.write_bytes(data[: data.rstrip(b"\n").rfind(b"\n") + 1] + b'{"id": "s5", "ind')  # killed mid-write
    model = FakeModel()
    assert run_benchmark(make_samples(), model, tmp_path, "MCUB-4", "choice", progress=False) == EXPECTED_METRICS
    assert model.calls == Counter({"s5": 1})
    assert path.read_bytes() == data


def test_damaged_or_foreign_prediction_files_are_errors(tmp_path: Path) -> None:
    path = tmp_path / "predictions.jsonl"
    path.write_text('{"id": "s0"}\nnot json\n', encoding="utf-8")
    with pytest.raises(MMComposeError, match=r"predictions\.jsonl:1: not a prediction record"):
        run_benchmark(make_samples(), FakeModel(), tmp_path, "MCUB-4", "choice", progress=False)
    run_benchmark(make_samples(), FakeModel(), tmp_path / "ok", "MCUB-4", "choice", progress=False)
    lines = (tmp_path / "ok" / "predictions.jsonl").read_text().splitlines()
    path.write_text(lines[0] + "\nnot json\n" + lines[1] + "\n", encoding="utf-8")
    with pytest.raises(MMComposeError, match=r"predictions\.jsonl:2: damaged record"):
        run_benchmark(make_samples(), FakeModel(), tmp_path, "MCUB-4", "choice", progress=False)
    path.write_text(lines[0] + "\n", encoding="utf-8")
    with pytest.raises(MMComposeError, match=r"sample id 's0' \(index 0\) is not in this benchmark shard"):
        run_benchmark(make_samples()[1:], FakeModel(), tmp_path, "MCUB-4", "choice", progress=False)


def test_shards_merge_to_the_unsharded_result(tmp_path: Path) -> None:
    run_benchmark(make_samples(), FakeModel(), tmp_path / "whole", "MCUB-4", "choice", progress=False)
    sharded = tmp_path / "sharded"
    models = [FakeModel() for _ in range(4)]
    shard_metrics = [
        run_benchmark(make_samples(), models[i], sharded, "MCUB-4", "choice", shard=(i, 4), progress=False)
        for i in range(4)
    ]
    # index % 4 == i: shard 0 has s0 and s4, shard 1 has s1 and s5, shards 2 and 3 one sample each
    assert [sorted(m.calls) for m in models] == [["s0", "s4"], ["s1", "s5"], ["s2"], ["s3"]]
    assert [m["n"] for m in shard_metrics] == [2, 2, 1, 1]
    assert shard_metrics[1]["shard"] == {"index": 1, "count": 4, "n_benchmark": 6}
    assert [r["id"] for r in read_lines(sharded / "predictions.shard0-of-4.jsonl")] == ["s0", "s4"]

    merged = merge_shards(sharded, 4)
    assert merged == EXPECTED_METRICS
    assert (sharded / "predictions.jsonl").read_bytes() == (tmp_path / "whole" / "predictions.jsonl").read_bytes()
    assert json.loads((sharded / "metrics.json").read_text()) == EXPECTED_METRICS


def test_merge_refuses_unfinished_or_mismatched_shards(tmp_path: Path) -> None:
    run_benchmark(make_samples(), FakeModel(), tmp_path, "MCUB-4", "choice", shard=(0, 2), progress=False)
    with pytest.raises(MMComposeError, match=r"metrics\.shard1-of-2\.json: missing, so shard 1 of 2 has not finished"):
        merge_shards(tmp_path, 2)
    run_benchmark(make_samples(), FakeModel(), tmp_path, "MCUB-3", "choice", shard=(1, 2), progress=False)
    with pytest.raises(MMComposeError, match="the shards come from different runs"):
        merge_shards(tmp_path, 2)
    with pytest.raises(MMComposeError, match="invalid shard count 0"):
        merge_shards(tmp_path, 0)


@pytest.mark.parametrize("shard", [(2, 2), (-1, 2), (0, 0), (1,)])
def test_invalid_shard(tmp_path: Path, shard: Any) -> None:
    with pytest.raises(MMComposeError, match="invalid shard"):
        run_benchmark(make_samples(), FakeModel(), tmp_path, "MCUB-4", "choice", shard=shard, progress=False)


def test_shard_files() -> None:
    assert shard_files(Path("out")) == (Path("out/predictions.jsonl"), Path("out/metrics.json"))
    assert shard_files(Path("out"), (2, 3)) == (
        Path("out/predictions.shard2-of-3.jsonl"),
        Path("out/metrics.shard2-of-3.json"),
    )


def test_other_exceptions_propagate(tmp_path: Path) -> None:
    def broken(samples: list[Sample]) -> list[str]:
        raise RuntimeError("CUDA out of memory")

    with pytest.raises(RuntimeError, match="CUDA out of memory"):
        run_benchmark(make_samples(), broken, tmp_path, "MCUB-4", "choice", progress=False)
    assert (tmp_path / "predictions.jsonl").read_text() == ""


def test_bad_gold_fails_before_any_prediction(tmp_path: Path) -> None:
    samples = make_samples()
    samples[3] = ask("s3", QUESTION, "no idea")
    model = FakeModel()
    with pytest.raises(InputError, match="sample 's3': gold answer 'no idea' is not an option letter"):
        run_benchmark(samples, model, tmp_path, "MCUB-4", "choice", progress=False)
    assert model.calls == Counter()
    with pytest.raises(MMComposeError, match="duplicate sample id 's0'"):
        run_benchmark([*make_samples(), make_samples()[0]], model, tmp_path, "MCUB-4", "choice", progress=False)
    with pytest.raises(MMComposeError, match="unknown task kind 'letters'"):
        run_benchmark(make_samples(), model, tmp_path, "MCUB-4", "letters", progress=False)


def _open_and_label_samples() -> tuple[list[Sample], list[Sample]]:
    open_samples = [
        ask("o0", "<audio><video> How many instruments?", "three"),
        ask("o1", "<audio><video> Which is louder?", "the cello"),
    ]
    label_samples = [
        ask("p0", "<point> What object is this?", "night_stand"),
        ask("p1", "<point> What object is this?", "chair"),
        ask("p2", "<point> What object is this?", "stand"),
    ]
    return open_samples, label_samples


def test_open_and_label_kinds(tmp_path: Path) -> None:
    open_samples, label_samples = _open_and_label_samples()
    answers = {"o0": "3", "o1": "Cello.", "p0": "A nightstand.", "p1": "two chairs", "p2": "hmm"}

    def predict(samples: list[Sample]) -> list[str]:
        return [answers[sample.id] for sample in samples]

    metrics = run_benchmark(open_samples, predict, tmp_path / "open", "MUSIC-AVQA", "open", progress=False)
    assert (metrics["n_correct"], metrics["n_unparseable"]) == (2, 0)
    assert "categories" not in metrics
    metrics = run_benchmark(label_samples, predict, tmp_path / "label", "ModelNet40", "label", progress=False)
    assert (metrics["n_correct"], metrics["n_unparseable"]) == (2, 1)
    parsed = [r["parsed"] for r in read_lines(tmp_path / "label" / "predictions.jsonl")]
    assert parsed == ["night_stand", "chair", None]


def test_empty_shard_and_progress_bar(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    samples = make_samples()[:1]
    metrics = run_benchmark(samples, FakeModel(), tmp_path, "MCUB-4", "choice", shard=(1, 2))
    assert (metrics["n"], metrics["accuracy"]) == (0, None)
    metrics = run_benchmark(samples, FakeModel(), tmp_path, "MCUB-4", "choice", progress=True)
    assert metrics["accuracy"] == 1.0
    assert capsys.readouterr().out == ""  # the bar goes to stderr


def test_batches_isolate_a_failing_sample(tmp_path: Path) -> None:
    model = FakeModel()
    batches: list[list[str]] = []

    def batched(samples: list[Sample]) -> list[str]:
        batches.append([s.id for s in samples])
        return model(samples)

    metrics = run_benchmark(make_samples(), batched, tmp_path, "MCUB-4", "choice", progress=False, batch_size=4)
    assert metrics == EXPECTED_METRICS
    assert batches == [["s0", "s1", "s2", "s3"], ["s4", "s5"], ["s4"], ["s5"]]
