"""The released ModelCompose system, end to end on CPU: tiny random versions of the four official single-modality
models (vision: CLIP + mlp2x_gelu; audio: BEATs + qformer_32N_2L; video: LanguageBind + mlp2x_gelu; point:
Point-BERT + mlp2x_gelu, trained `same` as released), each in the official layout -> `mmcompose import
modelcompose` -> `mmcompose compose` (DAMC, official `default-<modality>=lambda` coefficients) -> `mmcompose eval
--benchmark mcub` on an official-format MCUB-4 file -> `mmcompose export`.

The BEATs and LanguageBind encoders are the tiny configurations of the official parity fixtures, so the encoders
the composed model runs are the ones whose outputs match the official code.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import soundfile
import torch
import yaml
from PIL import Image
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from mmcompose.checkpoint import load_checkpoint
from mmcompose.cli import app
from mmcompose.modalities.point_bert import PointBERTEncoder
from tests.importers.fixtures import make_clip, make_modelcompose
from tests.io.media import encode_video
from tests.modalities.tiny import POINT_BERT

FIXTURES = Path(__file__).parents[1] / "fixtures" / "official"
RELEASED = {  # modality: (official strategy, projector, encoder width)
    "image": ("modal+language", "mlp2x_gelu", 24),
    "audio": ("modal+language", "qformer_32N_2L", 64),
    "video": ("modal+language", "mlp2x_gelu", 64),
    "point": ("same", "mlp2x_gelu", POINT_BERT["trans_dim"]),
}
LAMBDAS = "default-video=0.2,default-audio=0.3,default-vision=0.4,default-point=0.1"
runner = CliRunner()


def run(*args: object) -> str:
    result = runner.invoke(app, [str(arg) for arg in args])
    assert result.exit_code == 0, result.output
    return result.output


def _media(directory: Path) -> dict[str, str]:
    directory.mkdir()
    generator = np.random.default_rng(0)
    Image.fromarray(generator.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(directory / "cat.png")
    soundfile.write(directory / "meow.wav", (0.3 * generator.standard_normal(16000)).astype(np.float32), 16000)
    encode_video(directory / "walk.mp4", "libx264", 12)
    np.save(directory / "cat.npy", generator.standard_normal((600, 3)).astype(np.float32))
    return _media_paths()


def _media_paths() -> dict[str, str]:
    return {"vision": "media/cat.png", "audio": "media/meow.wav", "video": "media/walk.mp4", "point": "media/cat.npy"}


def test_four_released_models_import_compose_answer_and_export(llama_base: Path, tmp_path: Path) -> None:
    encoders = {"image": make_clip(tmp_path / "clip"), "audio": FIXTURES / "beats_audio_encoder",
                "video": FIXTURES / "languagebind_video_tower", "point": tmp_path / "point-bert.json"}
    torch.manual_seed(0)  # a bare Point-BERT state dict, as ModelCompose's point_bert_v1.2.pt, in a tiny size whose
    torch.save(PointBERTEncoder(**POINT_BERT).state_dict(), tmp_path / "point_bert.pt")  # heads the JSON states
    encoders["point"].write_text(json.dumps({"type": "point-bert", "options": POINT_BERT, "weights": "point_bert.pt"}))
    imported = {}
    for seed, (modality, (strategy, projector, width)) in enumerate(RELEASED.items()):
        official = tmp_path / "official" / modality
        make_modelcompose(official, llama_base, strategy, widths={modality: width}, projectors={modality: projector},
                          seed=seed)
        imported[modality] = tmp_path / "imported" / modality
        output = run("import", "modelcompose", official, "-o", imported[modality], "--base", llama_base,
                     "--encoder", f"{modality}={encoders[modality]}")
        assert f"imported {imported[modality]}: modalities {modality};" in " ".join(output.split())

    audio = load_checkpoint(imported["audio"]).spec.modalities[0]
    assert (audio.encoder.type, audio.processor.type, audio.connector.type) == ("beats", "beats-fbank", "qformer")
    video = load_checkpoint(imported["video"]).spec.modalities[0]
    assert (video.encoder.type, video.processor.type) == ("languagebind-video", "languagebind-video")
    point = load_checkpoint(imported["point"]).spec.modalities[0]
    assert (point.encoder.type, point.processor.options) == ("point-bert", {"num_points": 8192, "with_color": False})

    config = tmp_path / "compose.yaml"
    config.write_text(yaml.safe_dump({"method": "damc", "models": [{"path": str(p)} for p in imported.values()]}))
    composed = tmp_path / "composed"
    run("compose", config, "-o", composed, "--lambdas", LAMBDAS)
    model = load_checkpoint(composed).eval()
    assert [m.name for m in model.spec.modalities] == list(RELEASED)
    lambdas = {entry["name"]: entry["lambda"] for entry in model.provenance["composition"]["models"]}
    assert lambdas == {"image": 0.4, "audio": 0.3, "video": 0.2, "point": 0.1}

    # Composition keeps every encoder and connector exactly: the audio branch answers as the imported model's.
    single = load_checkpoint(imported["audio"]).eval()
    fbank = single.processors["audio"](_wave())
    with torch.no_grad():
        assert torch.equal(model.branches["audio"](fbank[None]), single.branches["audio"](fbank[None]))

    data = tmp_path / "mcub"
    data.mkdir()
    modal_inputs = {k: [v] for k, v in _media(data / "media").items()}
    question = ("<image>\n<audio>\n<video>\n<point>\nWhat do these four have in common?\n"
                "(A) they are animals\n(B) they are red\n(C) they are loud\n(D) they are small")
    (data / "MCUB-4.json").write_text(json.dumps([{"id": "mcub4-0", "modal_inputs": modal_inputs,
                                                    "conversations": [{"from": "human", "value": question}]}]))
    (data / "MCUB-answer.json").write_text(json.dumps([{"id": "mcub4-0", "conversations": [
        {"from": "human", "value": question}, {"from": "gpt", "value": "A"}]}]))
    run("eval", "--benchmark", "mcub", "--task", data, "--model", composed, "-o", tmp_path / "eval",
        "--max-new-tokens", "4")
    (record,) = [json.loads(line) for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert record["error"] is None and isinstance(record["prediction"], str)
    first = record["prediction"].strip()[:1]
    assert record["gold"] == "A" and record["correct"] == (first == "A")
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["n"] == 1

    # The released encoders build on the meta device and load in place: in bfloat16, and with every branch and a
    # decoder layer read from the disk at each forward, the composed model answers as it does in memory.
    names = {"vision": "image", "audio": "audio", "video": "video", "point": "point"}
    example = model.example(question, {names[key]: [data / path] for key, path in _media_paths().items()})
    half = load_checkpoint(composed, dtype="bfloat16").eval()
    assert {t.dtype for t in half.state_dict().values() if t.is_floating_point()} == {torch.bfloat16}
    assert half.generate([example], 4)[0].strip()
    mapping = {"llm": "cpu", "llm.model.layers.0": "disk", "branches": "disk"}
    offloaded = load_checkpoint(composed, device_map=mapping, offload_folder=tmp_path / "offload").eval()
    assert {p.device.type for p in offloaded.branches.parameters()} == {"meta"}
    assert offloaded.generate([example], 4) == model.generate([example], 4)

    run("export", composed, "--hf", tmp_path / "hf")
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "hf").config.hidden_size == model.llm.config.hidden_size


def _wave() -> np.ndarray:
    return (0.1 * np.sin(np.arange(12000) / 7.0)).astype(np.float32)


def run_bad(*args: object) -> str:
    result = runner.invoke(app, [str(arg) for arg in args])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def test_an_encoder_that_does_not_fit_its_config_is_one_line_and_writes_nothing(llama_base: Path,
                                                                                tmp_path: Path) -> None:
    official = tmp_path / "official"
    make_modelcompose(official, llama_base, "modal+language", widths={"video": 64}, projectors={"video": "mlp2x_gelu"})
    broken = tmp_path / "LanguageBind_Video_merge"
    broken.mkdir()
    source = FIXTURES / "languagebind_video_tower"
    config = json.loads((source / "config.json").read_text())
    config["vision_config"]["num_hidden_layers"] = 4  # the weights have 3 layers
    (broken / "config.json").write_text(json.dumps(config))
    (broken / "weights.safetensors").write_bytes((source / "weights.safetensors").read_bytes())
    line = run_bad("import", "modelcompose", official, "-o", tmp_path / "out", "--base", llama_base,
                   "--encoder", f"video={broken}")
    assert "weights.safetensors: weights do not match the LanguageBind config (missing key " \
           "vision_model.encoder.layers.3." in line
    assert not (tmp_path / "out").exists()


def test_official_lambdas_in_a_bad_form_are_one_line(tmp_path: Path) -> None:
    config = tmp_path / "compose.yaml"
    config.write_text(yaml.safe_dump({"method": "damc", "models": [{"path": "a"}]}))
    line = run_bad("compose", config, "-o", tmp_path / "out", "--lambdas", "video=0.5")
    assert line == "error: --lambdas: lambdas: Value error, expected default-<modality>=<lambda>, got 'video=0.5'"


def test_a_bare_point_bert_state_dict_shows_its_architecture(llama_base: Path, tmp_path: Path) -> None:
    """`--encoder point=point_bert_v1.2.pt`: width, depth, group-encoder width and colour come from the tensors."""
    official = tmp_path / "official"
    make_modelcompose(official, llama_base, "same", widths={"point": 12}, projectors={"point": "mlp2x_gelu"})
    torch.save(PointBERTEncoder(trans_dim=12, depth=3, encoder_dims=8, point_dims=6).state_dict(), tmp_path / "pb.pt")
    run("import", "modelcompose", official, "-o", tmp_path / "out", "--base", llama_base,
        "--encoder", f"point={tmp_path / 'pb.pt'}")
    (point,) = load_checkpoint(tmp_path / "out").spec.modalities
    assert point.encoder.options == dict(trans_dim=12, depth=3, num_heads=6, group_size=32, num_group=512,
                                         encoder_dims=8, point_dims=6, drop_cls=False)
    assert point.processor.options == {"num_points": 8192, "with_color": True}
