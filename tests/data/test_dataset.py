"""Lazy training data: decoding on indexing, DataLoader workers, the max-length policy, the feature cache and
bad input reaching the trainer (one line, before any step, nothing written)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmcompose.data.dataset import SampleDataset, StepBatches, load_training_samples, step_loader
from mmcompose.errors import InputError, MMComposeError
from mmcompose.model.mllm import MultimodalLLM
from mmcompose.train.trainer import TrainConfig, build_model, train
from tests.data.media import turns, write_json, write_png, write_wav
from tests.train.conftest import tiny_spec


@pytest.fixture(autouse=True)
def one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 samples over 6 PNG and 3 WAV files, one to three images each, an audio clip in every other one."""
    root = tmp_path_factory.mktemp("data")
    for k in range(6):
        write_png(root / "img" / f"{k}.png", k)
        write_wav(root / "aud" / f"{k}.wav", 10 + k)
    records = []
    for i in range(12):
        images = [f"img/{(i + j) % 6}.png" for j in range(1 + i % 3)]
        audio = [f"aud/{i % 6}.wav"] if i % 2 else []
        human = "<image>\n" * len(images) + "<audio>\n" * len(audio) + f"Question {i}?"
        records.append({"id": f"s{i}", "conversations": turns(human, f"answer {i} " + "word " * (i % 4)),
                        "modal_inputs": {"image": images, **({"audio": audio} if audio else {})}})
    write_json(root / "train.json", records)
    return root


def model_for(base: Path, seed: int = 0) -> MultimodalLLM:
    return build_model(base, [tiny_spec("image"), tiny_spec("audio")], strategy="decoupled", rank=2, seed=seed)


class Counting:
    """A processor wrapper that counts the files it decodes."""

    def __init__(self, processor: object) -> None:
        self.processor, self.calls = processor, 0

    def __call__(self, source: Path) -> torch.Tensor:
        self.calls += 1
        return self.processor(source)  # type: ignore[operator]


def test_media_are_decoded_only_when_an_item_is_fetched(llama_base: Path, data: Path) -> None:
    model = model_for(llama_base)
    counters = {m: Counting(p) for m, p in model.processors.items()}
    model.processors.update(counters)
    samples = load_training_samples([data / "train.json"], data, model).samples
    dataset = SampleDataset(model, samples)
    # one medium per modality measures its token count; nothing else is decoded up front
    assert {m: c.calls for m, c in counters.items()} == {"image": 1, "audio": 1}
    item = dataset[5]
    assert {m: c.calls for m, c in counters.items()} == {"image": 1 + 3, "audio": 1 + 1}
    assert item.id == "s5" and [t.shape for t in item.inputs["image"]] == [(3, 16, 16)] * 3
    assert torch.equal(item.inputs["image"][0], model.processors["image"].processor(data / "img/5.png"))
    assert model.assemble([item]).embeds.shape[1] == \
        model.assembler.sequence_length(item, dataset.positions)
    items = [dataset[i] for i in range(len(dataset))]
    assert model.assembler.sequence_lengths(items, dataset.positions, chunk=5) == \
        [model.assemble([e]).embeds.shape[1] for e in items]


def test_kept_inputs_are_decoded_once_within_the_budget(llama_base: Path, data: Path) -> None:
    model = model_for(llama_base)
    counters = {m: Counting(p) for m, p in model.processors.items()}
    model.processors.update(counters)
    dataset = SampleDataset(model, load_training_samples([data / "train.json"], data, model).samples)
    first = [dataset[i] for i in range(len(dataset))]
    calls = {m: c.calls for m, c in counters.items()}
    assert calls == {"image": 1 + 24, "audio": 1 + 6}  # nothing kept by default: every input of every item decoded
    image, audio = first[0].inputs["image"][0].nbytes, first[1].inputs["audio"][0].nbytes
    dataset.keep_decoded(image - 1)  # no room for any input
    [dataset[i] for i in range(len(dataset))]
    assert {m: c.calls - calls[m] for m, c in counters.items()} == {"image": 24, "audio": 6}
    calls = {m: c.calls for m, c in counters.items()}
    dataset.keep_decoded(6 * image + 3 * audio)  # room for the 6 distinct images and 3 distinct clips
    for _ in range(2):
        again = [dataset[i] for i in range(len(dataset))]
    assert {m: c.calls - calls[m] for m, c in counters.items()} == {"image": 6, "audio": 3}
    assert all(torch.equal(a, b) for x, y in zip(first, again, strict=True)
               for m in x.inputs for a, b in zip(x.inputs[m], y.inputs[m], strict=True))


def test_training_with_kept_inputs_gives_the_same_weights(llama_base: Path, data: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    samples = load_training_samples([data / "train.json"], data, model_for(llama_base)).samples
    settings = config(steps=6, batch_size=4)  # 3 steps per epoch: items come back, so inputs are kept
    kept = train(model_for(llama_base), samples, data, settings, tmp_path / "kept", progress=False)
    monkeypatch.setattr("mmcompose.train.trainer.KEEP_DECODED_BYTES", 0)
    decoded = train(model_for(llama_base), samples, data, settings, tmp_path / "decoded", progress=False)
    assert kept["final_loss"] == decoded["final_loss"]
    for key, value in load_file(tmp_path / "kept" / "model" / "model.safetensors").items():
        assert torch.equal(value, load_file(tmp_path / "decoded" / "model" / "model.safetensors")[key]), key


def test_workers_give_the_batches_of_the_main_process(llama_base: Path, data: Path) -> None:
    model = model_for(llama_base)
    dataset = SampleDataset(model, load_training_samples([data / "train.json"], data, model).samples)
    batches = StepBatches(dataset, seed=3, global_batch=4, rank=0, world=1, group_by_length=True, start=1, total=5)
    inline = list(step_loader(dataset, batches, num_workers=0))
    workers = list(step_loader(dataset, batches, num_workers=2))
    assert len(inline) == len(workers) == 4
    assert [[e.id for e in b] for b in inline] == [[e.id for e in b] for b in workers] == \
        [[dataset.samples[i].id for i in dataset.batch_indices(3, step, 4, 0, 1, True)] for step in range(1, 5)]
    for one, other in zip(inline, workers, strict=True):
        for a, b in zip(one, other, strict=True):
            assert a.prompt == b.prompt and a.target == b.target
            assert all(torch.equal(x, y) for m in a.inputs for x, y in zip(a.inputs[m], b.inputs[m], strict=True))


def test_samples_longer_than_max_length_are_skipped_and_counted(llama_base: Path, data: Path) -> None:
    """`max_length` counts tokens with each input as one token (the official tokenizer's `model_max_length`,
    before features go in); the LLM's positions limit counts every modality position."""
    model = model_for(llama_base)
    samples = load_training_samples([data / "train.json"], data, model).samples
    full = SampleDataset(model, samples)
    tokens = {s.id: model.assembler.sequence_length(full[i], dict.fromkeys(full.positions, 1))
              for i, s in enumerate(full.samples)}
    positions = {s.id: model.assembler.sequence_length(full[i], full.positions) for i, s in enumerate(full.samples)}
    assert any(positions[i] > tokens[i] + 1 for i in tokens)  # the inputs take several positions each
    limit = sorted(tokens.values())[len(tokens) // 2]
    cut = SampleDataset(model, samples, max_length=limit)
    assert [s.id for s in cut.samples] == [i for i, n in tokens.items() if n <= limit]
    assert sorted(b.id for b in cut.too_long) == sorted(i for i, n in tokens.items() if n > limit)
    assert "tokens exceed the maximum length" in str(cut.too_long[0])
    with pytest.raises(InputError, match=r"all 12 samples are too long"):
        SampleDataset(model, samples, max_length=3)
    model.assembler.max_length = sorted(positions.values())[len(positions) // 2]  # the LLM's positions
    by_positions = SampleDataset(model, samples, max_length=10_000)
    assert [s.id for s in by_positions.samples] == [i for i, n in positions.items() if n <= model.assembler.max_length]
    assert "positions exceed the LLM's" in str(by_positions.too_long[0])


def test_feature_cache_is_reused_and_keyed_by_encoder(llama_base: Path, data: Path, tmp_path: Path) -> None:
    model = model_for(llama_base)
    samples = load_training_samples([data / "train.json"], data, model).samples
    first = SampleDataset(model, samples)
    assert first.cache_features(model, tmp_path / "cache") == {"audio": {"cached": 0, "computed": 3},
                                                               "image": {"cached": 0, "computed": 6}}
    second = SampleDataset(model, samples)
    assert second.cache_features(model, tmp_path / "cache") == {"audio": {"cached": 3, "computed": 0},
                                                                "image": {"cached": 6, "computed": 0}}
    live = SampleDataset(model, samples)[4]
    cached_first, cached_second = first[4], second[4]
    encoder = model.branches["image"].encoder.eval()
    with torch.no_grad():
        expected = encoder(torch.stack(live.inputs["image"]))
    for got in (cached_first, cached_second):
        assert torch.equal(torch.stack(got.inputs["image"]), torch.stack(cached_first.inputs["image"]))
    torch.testing.assert_close(torch.stack(cached_second.inputs["image"]), expected, rtol=1e-5, atol=1e-6)
    assert sorted(second.encoded) == ["audio", "image"]

    other = model_for(llama_base, seed=1)  # other encoder weights: another fingerprint, nothing reused
    third = SampleDataset(other, samples)
    assert third.cache_features(other, tmp_path / "cache") == {"audio": {"cached": 0, "computed": 3},
                                                               "image": {"cached": 0, "computed": 6}}
    assert not torch.equal(torch.stack(third[4].inputs["image"]), torch.stack(cached_first.inputs["image"]))


def config(**changes: object) -> TrainConfig:
    return TrainConfig.model_validate({"stage": "instruct", "batch_size": 4, "steps": 3, "warmup_ratio": 0.0,
                                       "log_every": 1, "train_encoder": False, **changes})


def test_training_from_cached_features_matches_live_encoding(llama_base: Path, data: Path, tmp_path: Path) -> None:
    samples = load_training_samples([data / "train.json"], data, model_for(llama_base)).samples
    live = train(model_for(llama_base), samples, data, config(), tmp_path / "live", progress=False)
    settings = config(data={"cache_features": str(tmp_path / "cache"), "num_workers": 2})
    cached = train(model_for(llama_base), samples, data, settings, tmp_path / "cached", progress=False)
    assert cached["feature_cache"]["image"] == {"cached": 0, "computed": 6}
    again = train(model_for(llama_base), samples, data, settings, tmp_path / "again", progress=False)
    assert again["feature_cache"]["image"] == {"cached": 6, "computed": 0}
    for run in (cached, again):
        assert run["first_loss"] == pytest.approx(live["first_loss"], rel=1e-5)
        assert run["final_loss"] == pytest.approx(live["final_loss"], rel=1e-4)
    with pytest.raises(MMComposeError, match="cache_features needs frozen encoders"):
        train(model_for(llama_base), samples, data, config(train_encoder=True, data={"cache_features": "c"}),
              tmp_path / "trained-encoder", progress=False)
    assert not (tmp_path / "trained-encoder").exists()


def test_bad_training_input_fails_before_any_step_and_writes_nothing(llama_base: Path, data: Path,
                                                                     tmp_path: Path) -> None:
    model = model_for(llama_base)
    good = json.loads((data / "train.json").read_text())
    cases = {
        "missing medium": [*good, {**good[0], "id": "m", "modal_inputs": {"image": ["img/none.png"]}}],
        "modality the model lacks": [*good, {"id": "p", "conversations": turns("<point>", "x"),
                                             "modal_inputs": {"point": ["img/0.png"]}}],
        "malformed turns": [*good, {"id": "t", "conversations": [{"from": "human", "value": "x"}],
                                    "modal_inputs": {}}],
    }
    expected = {"missing medium": r"sample #12 \(id 'm'\): modal_inputs.image: image file not found",
                "modality the model lacks": r"sample #12 \(id 'p'\): modal_inputs.point: modality 'point', which "
                                            r"the model does not have",
                "malformed turns": r"sample #12 \(id 't'\): conversations: must alternate human and gpt turns"}
    for name, records in cases.items():
        path = write_json(tmp_path / f"{name}.json", records)
        with pytest.raises(InputError, match=f"^{path}: " + expected[name]):
            load_training_samples([path], data, model)
        with pytest.raises(InputError, match=expected[name]):
            train(model, records, data, config(), tmp_path / "out", progress=False)
        assert not (tmp_path / "out").exists()
        skipped = load_training_samples([path], data, model, on_bad_sample="skip")
        assert len(skipped.samples) == 12 and len(skipped.skipped) == 1
    with pytest.raises(InputError, match="contains no samples"):
        load_training_samples([write_json(tmp_path / "empty.json", [])], data, model)
    with pytest.raises(InputError, match=r"all 12 samples are too long .*exceed the maximum length 8"):
        train(model, good, data, config(data={"max_length": 8}), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()

    samples = load_training_samples([path], data, model, on_bad_sample="skip")
    full = SampleDataset(model, samples.samples)
    tokens = sorted(model.assembler.sequence_length(full[i], dict.fromkeys(full.positions, 1))
                    for i in range(len(full)))
    limit = tokens[-3] - 1  # the longest few exceed it
    metrics = train(model_for(llama_base), samples.samples, data, config(data={"max_length": limit}, steps=1),
                    tmp_path / "counted", progress=False, skipped=samples.skipped)
    too_long = len(SampleDataset(model, samples.samples, max_length=limit).too_long)
    assert too_long > 0
    assert metrics["skipped_samples"] == {"invalid": 1, "too_long": too_long}
    assert json.loads((tmp_path / "counted" / "metrics.json").read_text())["skipped_samples"]["too_long"] == too_long
    lines = (tmp_path / "counted" / "skipped_samples.txt").read_text().splitlines()
    assert len(lines) == 1 + too_long and lines[0].startswith(f"{path}: sample #12 (id 't'): conversations:")
    assert all(line.startswith(f"{path}: sample #") and "exceed the maximum length" in line for line in lines[1:])
