"""Composition semantics (NaiveMC, DAMC, merge operators) and every way a composition request can be wrong."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mmcompose.checkpoint import load_checkpoint, save_checkpoint
from mmcompose.compose.config import load_config, parse_config
from mmcompose.compose.engine import compose
from mmcompose.compose.operators import METHODS
from mmcompose.errors import CheckpointError, CompositionError
from mmcompose.model import Example, MultimodalLLM
from tests.conftest import make_base
from tests.model.helpers import random_input, randomize_deltas, tiny_modality

RANK, ALPHA = 2, 6.0


def _train_free_model(base: Path, out: Path, modality: str, strategy: str, seed: int) -> Path:
    model = MultimodalLLM.from_base(base, [tiny_modality(modality, boundary=1)], strategy=strategy, rank=RANK,
                                    alpha=ALPHA)
    randomize_deltas(model, seed=seed, scale=0.3)
    return save_checkpoint(model, out)


@pytest.fixture(scope="module")
def models(llama_base: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    made = {}
    for strategy in ("decoupled", "shared"):
        for seed, modality in enumerate(("image", "audio", "point")):
            made[f"{modality}-{strategy}"] = _train_free_model(llama_base, root / f"{modality}-{strategy}", modality,
                                                               strategy, seed + 10 * (strategy == "shared"))
    return made


def _config(paths: list[Path], **options) -> dict:
    return {"models": [{"path": str(p)} for p in paths], **options}


def _matrix(tensors: dict[str, torch.Tensor], delta: str, path: str, rank: int, alpha: float) -> torch.Tensor:
    key = f"deltas.{delta}.{path}"
    if f"{key}.weight" in tensors:
        return tensors[f"{key}.weight"]
    return alpha / rank * tensors[f"{key}.lora_B"] @ tensors[f"{key}.lora_A"]


def _paths(tensors: dict[str, torch.Tensor], delta: str) -> list[str]:
    prefix = f"deltas.{delta}."
    return sorted({n[len(prefix):].rpartition(".")[0] for n in tensors if n.startswith(prefix)})


def test_damc_linear_keeps_modality_deltas_and_sums_language_products(models: dict[str, Path], tmp_path: Path) -> None:
    inputs = [models["image-decoupled"], models["audio-decoupled"]]
    config = parse_config(_config(inputs, method="damc", merge="linear", lambdas={"image": 0.7, "audio": 0.4}))
    out = compose(config, tmp_path / "damc", progress=False)
    got = load_file(out / "model.safetensors")
    image, audio = (load_file(p / "model.safetensors") for p in inputs)
    paths = _paths(image, "language")
    assert len(paths) == 2 * 7
    for path in paths:
        expected = 0.7 * _matrix(image, "language", path, RANK, ALPHA) + 0.4 * _matrix(audio, "language", path,
                                                                                         RANK, ALPHA)
        torch.testing.assert_close(_matrix(got, "language", path, 2 * RANK, 2 * RANK), expected)
        assert got[f"deltas.language.{path}.lora_A"].shape[0] == 2 * RANK  # exactly low-rank, concatenated
        for name, source in (("image", image), ("audio", audio)):
            for factor in ("lora_A", "lora_B"):
                assert torch.equal(got[f"deltas.{name}.{path}.{factor}"], source[f"deltas.{name}.{path}.{factor}"])
    for name, tensor in image.items():
        if name.startswith("modalities."):
            assert torch.equal(got[name], tensor)
    composed = load_checkpoint(out)
    assert [m.name for m in composed.spec.modalities] == ["image", "audio"]
    assert {d.name: d.routes for d in composed.spec.deltas} == {"language": ["text"], "image": ["image"],
                                                                 "audio": ["audio"]}


def _image_prompt_logits(model: MultimodalLLM) -> torch.Tensor:
    example = Example(prompt="USER: <image> what is it? ASSISTANT:",
                      inputs={"image": [random_input("image", torch.Generator().manual_seed(4))]})
    with torch.no_grad():
        return model.eval()(model.assemble([example])).logits


@pytest.mark.parametrize(("method", "strategy"), [("damc", "decoupled"), ("damc", "shared"), ("naive", "shared")])
def test_one_hot_lambda_reproduces_the_source_model(models: dict[str, Path], tmp_path: Path, method: str,
                                                   strategy: str) -> None:
    """With lambda (1, 0) the composed model must answer an image prompt exactly like the image model."""
    inputs = [models[f"image-{strategy}"], models[f"audio-{strategy}"]]
    config = parse_config(_config(inputs, method=method, lambdas={"image": 1.0, "audio": 0.0}))
    composed = load_checkpoint(compose(config, tmp_path / "c", progress=False))
    torch.testing.assert_close(_image_prompt_logits(composed), _image_prompt_logits(load_checkpoint(inputs[0])),
                               rtol=1e-5, atol=1e-5)


def test_naive_uses_the_merged_delta_on_every_route(models: dict[str, Path], tmp_path: Path) -> None:
    inputs = [models["image-shared"], models["audio-shared"], models["point-shared"]]
    out = compose(parse_config(_config(inputs, method="naive")), tmp_path / "naive", progress=False)
    composed = load_checkpoint(out)
    assert [(d.name, d.routes, d.rank) for d in composed.spec.deltas] == [
        ("merged", ["text", "image", "audio", "point"], 3 * RANK)]
    got, sources = load_file(out / "model.safetensors"), [load_file(p / "model.safetensors") for p in inputs]
    for path in _paths(got, "merged"):
        expected = sum(_matrix(s, "shared", path, RANK, ALPHA) for s in sources) / 3
        torch.testing.assert_close(_matrix(got, "merged", path, 3 * RANK, 3 * RANK), expected)


@pytest.mark.parametrize("merge", ["ties", "dare_ties", "dare_linear", "magnitude_prune"])
def test_nonlinear_merges_store_dense_deltas_of_products(models: dict[str, Path], tmp_path: Path, merge: str) -> None:
    inputs = [models["image-decoupled"], models["audio-decoupled"]]
    config = parse_config(_config(inputs, method="damc", merge=merge, parameters={"density": 0.5}, seed=3))
    out = compose(config, tmp_path / merge, progress=False)
    got, sources = load_file(out / "model.safetensors"), [load_file(p / "model.safetensors") for p in inputs]
    generator = torch.Generator().manual_seed(3)
    for path in _paths(sources[0], "language"):  # the engine visits modules in this order
        products = [_matrix(s, "language", path, RANK, ALPHA) for s in sources]
        expected = METHODS[merge](products, [0.5, 0.5], {"density": 0.5}, generator)
        torch.testing.assert_close(got[f"deltas.language.{path}.weight"], expected)
    second = compose(config, tmp_path / f"{merge}-again", progress=False)
    assert all(torch.equal(t, load_file(second / "model.safetensors")[n]) for n, t in got.items())


def test_legacy_factorwise_mean_averages_factors(models: dict[str, Path], tmp_path: Path) -> None:
    inputs = [models["image-shared"], models["audio-shared"]]
    out = compose(parse_config(_config(inputs, method="naive", merge="factorwise_mean")), tmp_path / "legacy",
                  progress=False)
    got, sources = load_file(out / "model.safetensors"), [load_file(p / "model.safetensors") for p in inputs]
    path = _paths(got, "merged")[0]
    for factor in ("lora_A", "lora_B"):
        expected = (sources[0][f"deltas.shared.{path}.{factor}"] + sources[1][f"deltas.shared.{path}.{factor}"]) / 2
        torch.testing.assert_close(got[f"deltas.merged.{path}.{factor}"], expected)


def test_rename_allows_two_models_of_one_modality(models: dict[str, Path], llama_base: Path, tmp_path: Path) -> None:
    other = _train_free_model(llama_base, tmp_path / "image2", "image", "decoupled", seed=7)
    entries = [{"path": str(models["image-decoupled"])}, {"path": str(other), "rename": {"image": "sketch"}}]
    with pytest.raises(CompositionError, match="modality 'image' comes from both"):
        compose(parse_config({"method": "damc", "models": [*entries[:1], {"path": str(other)}]}), tmp_path / "x")
    composed = load_checkpoint(compose(parse_config({"method": "damc", "models": entries}), tmp_path / "renamed",
                                       progress=False))
    assert [(m.name, m.placeholder) for m in composed.spec.modalities] == [("image", "<image>"),
                                                                           ("sketch", "<sketch>")]
    assert not (tmp_path / "x").exists()


def test_different_bases_are_refused(models: dict[str, Path], tmp_path: Path) -> None:
    other_base = make_base(tmp_path / "other-base", seed=5)
    stranger = _train_free_model(other_base, tmp_path / "stranger", "audio", "decoupled", seed=1)
    with pytest.raises(CompositionError, match="trained on different base LLMs"):
        compose(parse_config(_config([models["image-decoupled"], stranger], method="damc")), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_naive_on_decoupled_models_is_refused(models: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(CompositionError, match=r"naive composition needs models with one delta.*use method damc"):
        compose(parse_config(_config([models["image-decoupled"]], method="naive")), tmp_path / "out")


def test_missing_and_unexpected_input_tensors(models: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(models["audio-decoupled"], broken)
    tensors = load_file(broken / "model.safetensors")
    victim = sorted(n for n in tensors if n.startswith("deltas.language."))[0]
    save_file({n: t for n, t in tensors.items() if n != victim}, broken / "model.safetensors")
    with pytest.raises(CheckpointError, match=re.escape(f"missing tensor {victim}")):
        compose(parse_config(_config([models["image-decoupled"], broken], method="damc")), tmp_path / "out")
    save_file({**tensors, "extras.thing": torch.zeros(2)}, broken / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"unexpected tensor extras\.thing"):
        compose(parse_config(_config([models["image-decoupled"], broken], method="damc")), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_interrupted_compose_leaves_no_output(models: dict[str, Path], tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("mmcompose.compose.engine._merge_module", interrupted)
    with pytest.raises(KeyboardInterrupt):
        compose(parse_config(_config([models["image-decoupled"], models["audio-decoupled"]], method="damc")),
                tmp_path / "out", progress=False)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"method": "damc", "models": [{"path": "a"}], "colour": 1}, "config: colour: unknown key"),
        ({"method": "damc", "models": [{"path": "a", "lamda": 1}]}, "config: models.0.lamda: unknown key"),
        ({"method": "mean", "models": [{"path": "a"}]}, "config: method: Input should be 'naive' or 'damc'"),
        ({"method": "damc", "merge": "slerp", "models": [{"path": "a"}]}, "config: merge: Value error, unknown merge"),
        ({"method": "damc", "merge": "ties", "models": [{"path": "a"}]},
         "config: merge method 'ties' needs parameter 'density'"),
        ({"method": "damc", "merge": "ties", "parameters": {"density": 1.5}, "models": [{"path": "a"}]},
         "config: density must be"),
        ({"method": "damc", "merge": "linear", "parameters": {"density": 0.5}, "models": [{"path": "a"}]},
         "config: merge method 'linear' has no parameter 'density'"),
        ({"method": "damc", "models": []}, "config: models: List should have at least 1 item"),
        (["not", "a", "mapping"], "config: expected a mapping"),
    ],
)
def test_bad_configs_fail_with_their_message(raw, message: str) -> None:
    with pytest.raises(CompositionError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        parse_config(raw)


def test_lambda_keys_must_name_models(models: dict[str, Path], tmp_path: Path) -> None:
    config = parse_config(_config([models["image-decoupled"]], method="damc", lambdas={"audio": 0.5}))
    with pytest.raises(CompositionError, match=r"lambdas: key 'audio' names no model \(models: image\)"):
        compose(config, tmp_path / "out")


def test_yaml_file_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: damc\nmodels: [\n")
    with pytest.raises(CompositionError, match="invalid YAML at line"):
        load_config(bad)
    with pytest.raises(CompositionError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
