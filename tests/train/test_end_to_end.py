"""End to end on CPU with nothing downloaded: a tiny random LLaMA with its tokenizer, tiny random CLIP vision and
Whisper encoders saved as local model directories, real PNG and WAV files, a LLaVA-layout image file and an
official-layout audio file -> stage 1 -> stage 2 (decoupled) per modality -> DAMC composition -> evaluation on
an official-format MCUB directory -> chat. About 10 s on two cores, so it runs in CI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import soundfile
from PIL import Image
from transformers import CLIPVisionConfig, CLIPVisionModel, WhisperConfig, WhisperModel
from typer.testing import CliRunner

from mmcompose.checkpoint import load_checkpoint
from mmcompose.cli import app
from tests.conftest import make_base

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 20)}
TONES = {"low": 220.0, "middle": 440.0, "high": 880.0, "very high": 1760.0}


def write_media(root: Path) -> None:
    (root / "images").mkdir(parents=True)
    (root / "sounds").mkdir()
    rng = np.random.default_rng(0)
    for name, colour in COLOURS.items():
        pixels = np.clip(np.array(colour) + rng.integers(-20, 20, (40, 48, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / "images" / f"{name}.png")
    time = np.arange(16000) / 16000
    for name, frequency in TONES.items():
        soundfile.write(root / "sounds" / f"{name.replace(' ', '_')}.wav", 0.5 * np.sin(2 * np.pi * frequency * time),
                        16000)


def llava_file(path: Path, question: str, answer: str) -> Path:
    """LLaVA's layout: one `image` per sample, `<image>` in the first human turn."""
    samples = [{"id": f"img-{name}", "image": f"images/{name}.png",
                "conversations": [{"from": "human", "value": f"<image>\n{question}"},
                                  {"from": "gpt", "value": answer.format(name=name)}]}
               for name in COLOURS for _ in range(2)]
    path.write_text(json.dumps(samples))
    return path


def official_file(path: Path, question: str, answer: str) -> Path:
    """ModelCompose's layout: `modal_inputs` keyed by modality."""
    samples = [{"id": f"aud-{name}", "modal_inputs": {"audio": [f"sounds/{name.replace(' ', '_')}.wav"]},
                "conversations": [{"from": "human", "value": f"<audio>\n{question}"},
                                  {"from": "gpt", "value": answer.format(name=name)}]}
               for name in TONES for _ in range(2)]
    path.write_text(json.dumps(samples))
    return path


def run(*arguments: str | Path) -> str:
    result = CliRunner().invoke(app, [str(a) for a in arguments])
    assert result.exit_code == 0, result.output
    return result.output


def test_real_encoders_two_stages_damc_eval_and_chat(tmp_path: Path) -> None:
    base = make_base(tmp_path / "vicuna-tiny", hidden=32, layers=2)
    CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=2, image_size=32, patch_size=8)).save_pretrained(
        tmp_path / "clip")
    WhisperModel(WhisperConfig(d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                               decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=80,
                               max_source_positions=50, max_target_positions=16, vocab_size=64, pad_token_id=0,
                               bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)).save_pretrained(
        tmp_path / "whisper")
    media = tmp_path / "media"
    write_media(media)
    data = {
        "image-stage1": llava_file(tmp_path / "image_caption.json", "Describe the image.", "A {name} square."),
        "image-stage2": llava_file(tmp_path / "image_instruct.json", "What colour is it?", "It is {name}."),
        "audio-stage1": official_file(tmp_path / "audio_caption.json", "Describe the sound.", "A {name} tone."),
        "audio-stage2": official_file(tmp_path / "audio_instruct.json", "How high is the tone?", "It is {name}."),
    }
    encoders = {"image": tmp_path / "clip", "audio": tmp_path / "whisper"}
    common = ["train", "modality", "--base", base, "--data-root", media, "--steps", "2", "--batch-size", "2",
              "--lr", "1e-3"]
    for modality, encoder in encoders.items():
        run(*common, "--modality", modality, "--encoder", f"{modality}={encoder}", "--connector", "mlp2x_gelu",
            "--data", data[f"{modality}-stage1"], "--stage", "pretrain", "-o", tmp_path / f"{modality}-1")
        run(*common, "--modality", modality, "--from", tmp_path / f"{modality}-1" / "model",
            "--data", data[f"{modality}-stage2"], "--stage", "instruct", "--strategy", "decoupled", "--rank", "4",
            "--boundary-tokens", "2", "--gradient-checkpointing", "--grad-accum", "2", "--batch-size", "1",
            "-o", tmp_path / f"{modality}-2")
        model = load_checkpoint(tmp_path / f"{modality}-2" / "model")
        assert model.spec.template == "vicuna_v1"  # the base's name says vicuna
        spec = model.spec.modalities[0]
        assert spec.encoder.type == {"image": "clip-vision", "audio": "whisper-audio"}[modality]
        assert spec.connector.type == "mlp2x_gelu" and spec.num_prefix_tokens == 2
        assert model.provenance["frozen_encoders"] == [modality]
        first = load_checkpoint(tmp_path / f"{modality}-1" / "model").checkpoint_tensors()
        assert all(value.equal(first[key]) for key, value in model.checkpoint_tensors().items()
                   if ".encoder." in key)  # the pretrained encoder stayed frozen through both stages

    (tmp_path / "compose.yaml").write_text(
        f"method: damc\nmerge: linear\nmodels:\n  - path: {tmp_path / 'image-2' / 'model'}\n"
        f"  - path: {tmp_path / 'audio-2' / 'model'}\n")
    run("compose", tmp_path / "compose.yaml", "-o", tmp_path / "composed")

    mcub = tmp_path / "mcub"
    mcub.mkdir()
    questions = [{"id": f"q{index}", "modal_inputs": {"vision": [f"../media/images/{colour}.png"],
                                                       "audio": [f"../media/sounds/{tone}.wav"]},
                  "conversations": [{"from": "human", "value": "<image>\n<audio>\nWhich is shown? "
                                     "A. red B. green C. blue D. yellow"}]}
                 for index, (colour, tone) in enumerate(zip(COLOURS, ["low", "middle", "high", "low"], strict=True))]
    (mcub / "MCUB-3-image-audio.json").write_text(json.dumps(questions))
    (mcub / "MCUB-answer.json").write_text(json.dumps({f"q{i}": "ABCD"[i] for i in range(4)}))
    output = run("eval", "--task", mcub, "--model", tmp_path / "composed", "-o", tmp_path / "eval",
                 "--batch-size", "2")
    assert "accuracy" in output
    metrics = json.loads(next((tmp_path / "eval").rglob("metrics.json")).read_text())
    assert metrics["n"] == 4

    answer = run("chat", "--model", tmp_path / "composed", "-i", f"image={media / 'images' / 'red.png'}",
                 "-i", f"audio={media / 'sounds' / 'low.wav'}", "--max-new-tokens", "4", "What do you see and hear?")
    assert answer.strip()
