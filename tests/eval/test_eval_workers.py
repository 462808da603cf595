"""The staged runner: media decoded in DataLoader workers, batches grouped by length, the text route folded.

None of it may change a result: the predictions file (records and their order) and the metrics equal what the
serial path writes, with a model predictor as it was before staging (one call per batch: decode, then
generate, the text route unfolded, batches in file order).
"""

from __future__ import annotations

import io
import json
import pickle
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from mmcompose.errors import InputError
from mmcompose.eval.benchmark import Sample, load_benchmark
from mmcompose.eval.predict import ModelPredictor, model_predictor
from mmcompose.eval.runner import StagedPredictor, default_num_workers, run_benchmark
from mmcompose.model import Component, Example, MultimodalLLM
from tests.data.media import write_json, write_png, write_wav
from tests.eval.fakes import ask, read_lines
from tests.io.media import encode_video
from tests.model.helpers import randomize_deltas, tiny_modality

MAX_NEW_TOKENS = 6
PROCESSORS = {
    "image": Component(type="image", options=dict(size=16)),
    "audio": Component(type="audio", options=dict(sample_rate=16000, num_samples=1600)),
    "video": Component(type="video", options=dict(num_frames=2, size=16)),
    "point": Component(type="point", options=dict(num_points=64)),
}
OPTIONS = "A. forest\nB. fruit\nC. grass\nD. red\nAnswer with one of the options."


@pytest.fixture(scope="module")
def model(llama_base: Path) -> MultimodalLLM:
    specs = [tiny_modality(m, boundary=1).model_copy(update={"processor": PROCESSORS[m]}) for m in PROCESSORS]
    torch.manual_seed(0)
    model = MultimodalLLM.from_base(llama_base, specs, strategy="decoupled", rank=4, alpha=8.0)
    randomize_deltas(model, seed=1, scale=0.5)  # so the media and the deltas change what the model says
    return model.eval()


@pytest.fixture(scope="module")
def benchmark(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A world-like MCUB file: 4-, 2- and 1-input questions of several lengths, one with a corrupt PNG."""
    root = tmp_path_factory.mktemp("bench")
    rng = np.random.default_rng(0)
    for i in range(4):
        write_png(root / "media" / f"image{i}.png", i)
        write_wav(root / "media" / f"audio{i}.wav", i)
        encode_video(root / "media" / f"video{i}.mp4", "libx264", 3,
                     frame_fn=lambda k, i=i: np.full((32, 48, 3), 40 * i + 10 * k, np.uint8))
        np.save(root / "media" / f"point{i}.npy", rng.normal(size=(100, 3)).astype(np.float32))
    (root / "media" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not an image" * 8)
    layouts = [("image", "audio", "video", "point"), ("image", "point"), ("audio",), ("video", "audio"),
               ("image", "audio", "video", "point"), ("point",), ("image",), ("audio", "video", "point")]
    suffix = {"image": "png", "audio": "wav", "video": "mp4", "point": "npy"}
    items = []
    for i in range(14):
        modalities = layouts[i % len(layouts)]
        inputs = {m: [f"media/{m}{(i + k) % 4}.{suffix[m]}"] for k, m in enumerate(modalities)}
        if i == 9:
            inputs = {"image": ["media/broken.png"], "point": ["media/point0.npy"]}
            modalities = ("image", "point")
        question = " ".join(["What do they all have in common?"] + ["Think."] * (i % 5))
        human = "\n".join([f"<{m}>" for m in modalities] + [question, OPTIONS])
        items.append({"id": f"mcub-{i:02d}", "conversations": [{"from": "human", "value": human},
                                                                {"from": "gpt", "value": "ABCD"[i % 4]}],
                      "modal_inputs": inputs})
    return write_json(root / "mcub.json", items), root


def serial_predictor(model: MultimodalLLM) -> Any:
    """The model predictor as it was before staging: decode and generate in one call, nothing folded."""
    def predict(samples: Sequence[Sample]) -> list[str]:
        examples = [model.conversation_example([t for t in s.conversations if t["from"] == "human"],
                                               s.modal_inputs, id=s.id) for s in samples]
        return model.generate(examples, max_new_tokens=MAX_NEW_TOKENS)

    return predict


def test_workers_grouping_and_folding_write_what_the_serial_path_writes(
        model: MultimodalLLM, benchmark: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    file, root = benchmark
    samples = load_benchmark(file, root)
    reference = run_benchmark(samples, serial_predictor(model), tmp_path / "serial", "MCUB-4", "choice",
                              progress=False, batch_size=4)
    expected = (tmp_path / "serial" / "predictions.jsonl").read_text()
    records = read_lines(tmp_path / "serial" / "predictions.jsonl")
    assert len({r["prediction"] for r in records if r["error"] is None}) > 3  # the answers depend on the item
    failed = [r for r in records if r["error"] is not None]
    assert [r["id"] for r in failed] == ["mcub-09"] and "broken.png" in failed[0]["error"]

    batches: list[list[str]] = []
    folded: list[bool] = []
    generate = model.generate

    def spy(examples: list[Any], *args: Any, **kwargs: Any) -> list[str]:
        batches.append([example.id for example in examples])
        folded.append(model.routing.folded)
        return generate(examples, *args, **kwargs)

    monkeypatch.setattr(model, "generate", spy)
    predictor = model_predictor(model, MAX_NEW_TOKENS)
    assert isinstance(predictor, StagedPredictor)
    for workers in (0, 2):
        batches.clear()
        out = tmp_path / f"workers{workers}"
        metrics = run_benchmark(samples, predictor, out, "MCUB-4", "choice", progress=False, batch_size=4,
                                num_workers=workers)
        assert metrics == reference
        assert (out / "predictions.jsonl").read_text() == expected
        # batches hold items with the same inputs, longest first; the corrupt item never reaches the model
        counts = {s.id: tuple(len(s.modal_inputs.get(m, ())) for m in PROCESSORS) for s in samples}
        order = [counts[i] for batch in batches for i in batch]
        assert order == sorted(order, reverse=True) and order[:4] == [(1, 1, 1, 1)] * 4
        assert all("mcub-09" not in batch for batch in batches)
    assert all(folded) and not model.routing.folded  # folded while answering, unfolded after


def test_the_preparation_pickles_without_the_model(model: MultimodalLLM, benchmark: tuple[Path, Path]) -> None:
    class Guard(pickle.Pickler):
        def persistent_id(self, obj: Any) -> None:
            assert not isinstance(obj, (torch.nn.Module, torch.Tensor)), f"pickles {type(obj).__name__}"

    predictor = ModelPredictor(model, MAX_NEW_TOKENS)
    buffer = io.BytesIO()
    Guard(buffer).dump(predictor.prepare)
    restored = pickle.loads(buffer.getvalue())
    sample = load_benchmark(*benchmark)[0]
    original, copied = predictor.prepare(sample), restored(sample)
    assert copied.prompt == original.prompt and copied.inputs.keys() == original.inputs.keys() == set(PROCESSORS)
    assert all(torch.equal(a, b) for m in PROCESSORS for a, b in zip(copied.inputs[m], original.inputs[m],
                                                                      strict=True))


class Staged:
    """A scripted staged predictor: `prepare` fails for `bad` ids (InputError) or `crash` ids (RuntimeError);
    `sort_keys` is the question's length, longest first; answers record their batches."""

    def __init__(self, bad: Sequence[str] = (), crash: Sequence[str] = (), kill_after: int | None = None) -> None:
        self.prepare = Prepare(tuple(bad), tuple(crash))
        self.batches: list[list[str]] = []
        self.kill_after = kill_after
        self.wrapped = 0

    def __call__(self, samples: Sequence[Sample]) -> list[str]:
        return self.answer([self.prepare(s) for s in samples])

    def answer(self, prepared: Sequence[str]) -> list[str]:
        if self.kill_after is not None and len(self.batches) == self.kill_after:
            raise KeyboardInterrupt
        self.batches.append(list(prepared))
        return ["B" if len(sid) % 2 else "A" for sid in prepared]

    def sort_keys(self, samples: Sequence[Sample]) -> list[int]:
        return [-len(s.question) for s in samples]

    @contextmanager
    def evaluating(self) -> Iterator[None]:
        self.wrapped += 1
        yield


class Prepare:
    def __init__(self, bad: tuple[str, ...], crash: tuple[str, ...]) -> None:
        self.bad, self.crash = bad, crash

    def __call__(self, sample: Sample) -> str:
        if sample.id in self.bad:
            raise InputError(f"{sample.id}: media/{sample.id}.png: cannot decode image")
        if sample.id in self.crash:
            raise RuntimeError("a bug")
        return sample.id


def questions() -> list[Sample]:
    return [ask(f"q{i}", "x" * (i * 7 % 10 + 1), "A") for i in range(10)]


@pytest.mark.parametrize("workers", [0, 2])
def test_grouped_batches_and_errors_in_workers(workers: int, tmp_path: Path) -> None:
    predictor = Staged(bad=["q3"])
    metrics = run_benchmark(questions(), predictor, tmp_path, "T", "choice", progress=False, batch_size=3,
                            num_workers=workers)
    lengths = {s.id: len(s.question) for s in questions()}
    assert [lengths[i] for batch in predictor.batches for i in batch] == sorted(
        (lengths[s.id] for s in questions() if s.id != "q3"), reverse=True)
    records = read_lines(tmp_path / "predictions.jsonl")
    assert [r["index"] for r in records] == list(range(10))  # the file in sample order
    assert records[3]["error"] == "q3: media/q3.png: cannot decode image" and metrics["n_failed"] == 1
    assert predictor.wrapped == 1
    with pytest.raises(RuntimeError, match="a bug"):  # anything else than a bad input stops the run
        run_benchmark(questions(), Staged(crash=["q5"]), tmp_path / "crash", "T", "choice", progress=False,
                      batch_size=3, num_workers=workers)


def test_a_killed_grouped_run_resumes_to_the_same_file(tmp_path: Path) -> None:
    whole = tmp_path / "whole"
    run_benchmark(questions(), Staged(), whole, "T", "choice", progress=False, batch_size=3)
    with pytest.raises(KeyboardInterrupt):
        run_benchmark(questions(), Staged(kill_after=2), tmp_path / "killed", "T", "choice", progress=False,
                      batch_size=3)
    assert len(read_lines(tmp_path / "killed" / "predictions.jsonl")) == 6  # two batches, out of sample order
    resumed = Staged()
    run_benchmark(questions(), resumed, tmp_path / "killed", "T", "choice", progress=False, batch_size=3)
    assert sum(len(batch) for batch in resumed.batches) == 4
    assert (tmp_path / "killed" / "predictions.jsonl").read_text() == (whole / "predictions.jsonl").read_text()
    assert json.loads((tmp_path / "killed" / "metrics.json").read_text()) == json.loads(
        (whole / "metrics.json").read_text())


def test_bad_worker_settings_and_the_default() -> None:
    with pytest.raises(Exception, match="num_workers -1"):
        run_benchmark(questions(), Staged(), Path("unused"), "T", "choice", progress=False, num_workers=-1)
    assert 0 <= default_num_workers() <= 4


def test_the_text_route_is_folded_when_the_estimate_says_so(model: MultimodalLLM, llama_base: Path) -> None:
    """`folding_pays` estimates from the batch's routes as `generate` assembles them (the decisions themselves, as
    measured, are in test_fold_cost.py); `evaluating` applies it, or the forced choice, and unfolds after."""
    generator = torch.Generator().manual_seed(0)
    images = [torch.randn(3, 16, 16, generator=generator) for _ in range(3)]
    heavy = Example(prompt="USER: " + "<image>" * 3 + " same? ASSISTANT:", inputs={"image": images})
    chatty = Example(prompt="USER: <image> " + "tell me about it, " * 6 + "ASSISTANT:", inputs={"image": images[:1]})
    predictor = ModelPredictor(model, max_new_tokens=2)
    assert torch.equal(predictor._routes([heavy, chatty]), model.assemble([heavy, chatty], padding_side="left").routes)
    bad = Example(prompt="USER: <image> ASSISTANT:")  # a placeholder without its input: no positions, no error
    assert torch.equal(predictor._routes([bad, chatty])[1], predictor._routes([chatty])[0])

    shared = MultimodalLLM.from_base(llama_base, [tiny_modality("image")], strategy="shared", rank=2)
    assert ModelPredictor(shared, max_new_tokens=2).folding_pays([heavy])  # no correction is left
    connector_only = MultimodalLLM.from_base(llama_base, [tiny_modality("image")])
    assert not ModelPredictor(connector_only, 2).folding_pays([chatty])  # no text delta to fold

    folded: list[bool] = []
    for fold, subject in ((None, shared), (None, connector_only), (True, model), (False, shared)):
        predictor = ModelPredictor(subject, max_new_tokens=2, fold=fold)
        with predictor.evaluating():
            predictor.answer([heavy])
            folded.append(subject.routing.folded)
        assert not subject.routing.folded
    assert folded == [True, False, True, False]


def test_the_eval_command_takes_num_workers(model: MultimodalLLM, benchmark: tuple[Path, Path],
                                            tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from mmcompose.checkpoint import save_checkpoint
    from mmcompose.cli import app

    checkpoint = save_checkpoint(model, tmp_path / "model")
    file, root = benchmark
    written = []
    for workers in ("0", "2"):
        out = tmp_path / f"out{workers}"
        result = CliRunner().invoke(app, ["eval", "--task", str(file), "--data-root", str(root), "--model",
                                          str(checkpoint), "-o", str(out), "--batch-size", "4", "--max-new-tokens",
                                          str(MAX_NEW_TOKENS), "--num-workers", workers])
        assert result.exit_code == 0, result.output
        assert "1 failed" in result.output
        written.append((out / "predictions.jsonl").read_text())
    assert written[0] == written[1]
    bad = CliRunner().invoke(app, ["eval", "--task", str(file), "--model", str(checkpoint), "-o", str(tmp_path / "x"),
                                   "--num-workers", "-1"])
    assert bad.exit_code == 2 and "--num-workers" in bad.output
