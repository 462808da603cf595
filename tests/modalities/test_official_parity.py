"""Parity with the official ModelCompose modules: BEATs with its filterbank, the qformer_32N_2L connector and the
LanguageBind video tower reproduce the outputs the official code computed on tiny randomised instances
(`tests/fixtures/official/*`, whose READMEs give the shapes, constants and tolerances).

Weights load through the loaders users run (`BEATsEncoder.from_checkpoint` on both the released `.pt` layout and
the config.json + safetensors layout, `LanguageBindVideoEncoder.from_pretrained`, and for the Q-Former the
connector registry plus the importer's key renaming). Reached on this machine (float32, CPU): fbank 1.2e-5,
BEATs 1.9e-6, Q-Former 1.1e-6, LanguageBind 2.2e-6 max |diff|; the tests assert atol 1e-4 (raw fbank 1e-3, as
the README suggests for values up to ~25).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from safetensors.torch import load_file, save_file

from mmcompose.errors import CheckpointError, InputError
from mmcompose.modalities import build_connector, build_encoder, build_processor
from mmcompose.modalities.beats import BEATsEncoder, BeatsFbankProcessor, kaldi_fbank
from mmcompose.modalities.languagebind import LanguageBindVideoEncoder, LanguageBindVideoProcessor
from mmcompose.modalities.qformer import rename_official

FIXTURES = Path(__file__).parents[1] / "fixtures" / "official"
BEATS, QFORMER, VIDEO = FIXTURES / "beats_audio_encoder", FIXTURES / "qformer_32N_2L_audio_projector", \
    FIXTURES / "languagebind_video_tower"
ATOL = 1e-4


def _close(actual: torch.Tensor, expected: torch.Tensor, atol: float = ATOL) -> None:
    torch.testing.assert_close(actual, expected, atol=atol, rtol=1e-4)


@pytest.fixture(scope="module")
def beats_io() -> dict[str, torch.Tensor]:
    return load_file(BEATS / "io.safetensors")


def test_kaldi_fbank_matches_the_official_filterbank(beats_io: dict[str, torch.Tensor]) -> None:
    for i in range(2):
        raw = kaldi_fbank(beats_io[f"waveform_{i}"] * 32768.0)
        _close(raw, beats_io[f"fbank_raw_{i}"], atol=1e-3)
        floor = beats_io[f"fbank_raw_{i}"][:, 3]  # mel bin 3 holds no FFT bin: log(float32 eps) in every frame
        assert torch.equal(raw[:, 3], floor) and floor[0].item() == pytest.approx(-15.942385)


def test_the_processor_reads_a_wav_file_as_the_official_processor(beats_io: dict[str, torch.Tensor],
                                                                    tmp_path: Path) -> None:
    processor = build_processor("beats-fbank", {})
    for i in range(2):
        path = tmp_path / f"clip{i}.wav"
        soundfile.write(path, beats_io[f"waveform_{i}"].numpy(), 16000, subtype="FLOAT")
        _close(processor(str(path)), beats_io["fbank"][i])
    assert beats_io["fbank"].shape[1:] == (1024, 128) and not beats_io["fbank_padding_mask"].any()


@pytest.mark.parametrize("layout", ["directory", "released-pt"])
def test_beats_matches_the_official_encoder(beats_io: dict[str, torch.Tensor], tmp_path: Path, layout: str) -> None:
    source = BEATS
    if layout == "released-pt":  # the released checkpoint's layout: {"cfg": ..., "model": state_dict}
        cfg = json.loads((BEATS / "config.json").read_text())["beats_cfg"]
        source = tmp_path / "BEATs_iter3_plus_AS2M.pt"
        torch.save({"cfg": cfg, "model": load_file(BEATS / "weights.safetensors")}, source)
    encoder = BEATsEncoder.from_checkpoint(source)
    with torch.no_grad():
        _close(encoder(beats_io["fbank"]), beats_io["encoder_out"])
        masked = beats_io["extra_masked_fbank_padding_mask"]
        _close(encoder(beats_io["fbank"], masked), beats_io["extra_masked_encoder_out"])
    assert torch.equal(encoder.valid_mask(masked, 512), beats_io["extra_masked_encoder_valid_mask"])
    rebuilt = build_encoder("beats", encoder.options)  # what a saved checkpoint rebuilds before loading tensors
    rebuilt.load_state_dict(encoder.state_dict())
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(beats_io["fbank"]), encoder(beats_io["fbank"]))


def test_qformer_matches_the_official_projector() -> None:
    io = load_file(QFORMER / "io.safetensors")
    config = json.loads((QFORMER / "config.json").read_text())
    bert = config["bert_config"]
    connector = build_connector("qformer", config["vision_width_encoder_width"], config["llm_width_hardcoded"],
                                num_queries=config["num_query_token"], num_layers=config["num_hidden_layers"],
                                width=bert["hidden_size"], num_heads=bert["num_attention_heads"],
                                intermediate_size=bert["intermediate_size"], num_positions=config["num_positions"],
                                layer_norm_eps=bert["layer_norm_eps"])
    official = load_file(QFORMER / "weights.safetensors")
    renamed = {rename_official(key): value for key, value in official.items() if rename_official(key) is not None}
    connector.load_state_dict(renamed, strict=True)
    with torch.no_grad():
        _close(connector.eval()(io["encoder_features"]), io["projector_out"])


def test_the_audio_chain_runs_end_to_end(beats_io: dict[str, torch.Tensor]) -> None:
    """waveform -> fbank -> BEATs -> Q-Former, from our own processor output, against the official projector."""
    io = load_file(QFORMER / "io.safetensors")
    processor = BeatsFbankProcessor()
    fbank = torch.stack([processor.from_wave(beats_io[f"waveform_{i}"]) for i in range(2)])
    with torch.no_grad():
        features = BEATsEncoder.from_checkpoint(BEATS)(fbank)
    _close(features, io["encoder_features"])


def test_languagebind_matches_the_official_tower() -> None:
    io = load_file(VIDEO / "io.safetensors")
    encoder = LanguageBindVideoEncoder.from_pretrained(VIDEO)
    pixels = io["pixel_values"].permute(0, 2, 1, 3, 4)  # official (n, 3, T, H, W) -> ours (n, T, 3, H, W)
    with torch.no_grad():
        _close(encoder(pixels), io["video_features"].flatten(1, 2))
        states = encoder.hidden_states(pixels)
        _close(torch.stack(states), io["extra_all_hidden_states"])
        _close(states[-1].flatten(0, 1), io["extra_last_hidden_state"])
        pooled = encoder.vision_model.post_layernorm(states[-1][:, :, 0]).mean(1)
        _close(pooled, io["extra_pooler_output"])
    assert encoder(pixels).shape == (2, 8 * 17, 64)


def test_the_languagebind_processor_gives_eight_normalised_frames(tmp_path: Path) -> None:
    frames = np.zeros((12, 30, 40, 3), dtype=np.uint8)
    frames[:, :, :, 0] = np.arange(12, dtype=np.uint8).reshape(12, 1, 1) * 20
    pixels = LanguageBindVideoProcessor(size=28)(frames)
    assert pixels.shape == (8, 3, 28, 28)
    red = pixels[:, 0, 14, 14] * 0.26862954 + 0.48145466  # undo CLIP normalisation: frame index * 20 / 255
    expected = np.round(np.linspace(0, 11, 8)) * 20 / 255  # 8 frames spread over 12, nearest in time
    np.testing.assert_allclose(red.numpy(), expected, atol=1e-5)


# --- bad input ---------------------------------------------------------------------------------------------


def _copy(source: Path, target: Path, change) -> Path:
    target.mkdir()
    (target / "config.json").write_text((source / "config.json").read_text())
    weights = load_file(source / "weights.safetensors")
    change(weights)
    save_file(weights, target / "weights.safetensors")
    return target


@pytest.mark.parametrize("change, message", [
    (lambda w: w.pop("encoder.layers.1.fc1.bias"), r"missing key encoder\.layers\.1\.fc1\.bias"),
    (lambda w: w.update(extra=torch.zeros(1)), "unexpected key extra"),
    (lambda w: w.update({"post_extract_proj.weight": torch.zeros(64, 32)}),
     r"key post_extract_proj\.weight has shape \(64, 32\), the config implies \(64, 48\)"),
])
def test_beats_weights_that_do_not_fit_the_config_are_refused(tmp_path: Path, change, message: str) -> None:
    directory = _copy(BEATS, tmp_path / "beats", change)
    with pytest.raises(CheckpointError, match=f"weights.safetensors: .*{message}"):
        BEATsEncoder.from_checkpoint(directory)


def test_languagebind_weights_that_do_not_fit_the_config_are_refused(tmp_path: Path) -> None:
    directory = _copy(VIDEO, tmp_path / "video", lambda w: w.pop("vision_model.encoder.layers.2.temporal_embedding"))
    with pytest.raises(CheckpointError, match=r"weights.safetensors: .*missing key vision_model\.encoder\.layers\.2"
                                              r"\.temporal_embedding"):
        LanguageBindVideoEncoder.from_pretrained(directory)


def test_a_clip_shorter_than_one_frame_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "click.wav"
    soundfile.write(path, np.zeros(399, dtype=np.float32), 16000)
    with pytest.raises(InputError, match=r"click\.wav: 399 samples is shorter than one 25 ms filterbank frame"):
        BeatsFbankProcessor()(str(path))
    assert BeatsFbankProcessor().from_wave(np.zeros(400, dtype=np.float32)).shape == (1024, 128)


def test_a_video_tensor_with_the_wrong_frame_count_is_refused() -> None:
    encoder = LanguageBindVideoEncoder.from_pretrained(VIDEO)
    with pytest.raises(InputError, match=r"expected \(n, 8, 3, H, W\) frames, got shape \(1, 3, 3, 56, 56\); it "
                                         r"needs exactly 8 frames"):
        encoder(torch.zeros(1, 3, 3, 56, 56))
