"""CLIP (image and video), Whisper and CLAP wrappers on tiny random configs: shapes, rebuild from `options`,
loading from a local `save_pretrained` directory, and refusal of what is not such a checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import (
    ClapConfig,
    ClapFeatureExtractor,
    ClapModel,
    CLIPConfig,
    CLIPModel,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
)
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from mmcompose.errors import CheckpointError
from mmcompose.modalities import build_encoder
from mmcompose.modalities.clap import CLAPAudioEncoder
from mmcompose.modalities.clip import CLIPVisionEncoder
from mmcompose.modalities.whisper import WhisperAudioEncoder
from tests.modalities.tiny import CLAP_AUDIO, CLAP_FEATURES, CLIP_VISION, WHISPER, assert_equivalent, rebuilt

TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=99,
            bos_token_id=0, eos_token_id=1, pad_token_id=1)


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# --- CLIP ---------------------------------------------------------------------------------------------------


def test_clip_video_tokens_are_the_per_frame_image_tokens() -> None:
    torch.manual_seed(0)
    concat = CLIPVisionEncoder(CLIP_VISION).eval()
    mean = CLIPVisionEncoder(**{**concat.options, "frame_pooling": "mean"}).eval()
    mean.load_state_dict(concat.state_dict())
    videos = _randn(2, 3, 3, 16, 16)  # (n, frames, 3, H, W)
    with torch.no_grad():
        per_frame = torch.stack([concat(videos[:, t]) for t in range(3)], dim=1)  # (n, frames, 4 patches, 32)
        assert per_frame.shape == (2, 3, 4, 32)
        torch.testing.assert_close(concat(videos), per_frame.flatten(1, 2))
        torch.testing.assert_close(mean(videos), per_frame.mean(1))


def test_clip_feature_layer_and_cls() -> None:
    torch.manual_seed(0)
    encoder = CLIPVisionEncoder(CLIP_VISION, feature_layer=-1, drop_cls=False).eval()
    images = _randn(2, 3, 16, 16)
    with torch.no_grad():
        tokens = encoder(images)
        assert tokens.shape == (2, 1 + 4, 32)
        torch.testing.assert_close(tokens, encoder.model(images).last_hidden_state)


def test_clip_rebuilds_from_options_and_loads_a_local_clip_directory(tmp_path: Path) -> None:
    torch.manual_seed(0)
    clip = CLIPModel(CLIPConfig(text_config=TEXT, vision_config=CLIP_VISION, projection_dim=16))
    clip.save_pretrained(tmp_path / "clip")
    encoder = CLIPVisionEncoder.from_pretrained(str(tmp_path / "clip")).eval()
    images = _randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = clip.vision_model(images, output_hidden_states=True).hidden_states[-2][:, 1:]
        torch.testing.assert_close(encoder(images), expected)
    assert_equivalent(encoder, rebuilt(encoder), images)


# --- Whisper ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def whisper() -> WhisperAudioEncoder:
    torch.manual_seed(0)
    return WhisperAudioEncoder(WHISPER).eval()


def test_whisper_shapes_and_batch_independence(whisper: WhisperAudioEncoder) -> None:
    waves = _randn(3, 16000)
    with torch.no_grad():
        tokens = whisper(waves)
        assert tokens.shape == (3, 50, 32) and whisper.output_dim == 32
        one_by_one = torch.cat([whisper(waves[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(tokens, one_by_one, atol=1e-5, rtol=1e-5)


def test_whisper_pads_short_input_to_its_window(whisper: WhisperAudioEncoder) -> None:
    short = _randn(1, 4000)
    padded = torch.cat([short, torch.zeros(1, 12000)], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(whisper(short), whisper(padded))
        assert whisper(_randn(1, 40000)).shape == (1, 50, 32)  # longer inputs are truncated to the window


def test_whisper_feature_layer_pooling_and_trimming(whisper: WhisperAudioEncoder) -> None:
    waves = _randn(2, 4000)  # a quarter of the 1 s window: ceil(4000 / 320) = 13 tokens cover it
    layer1 = WhisperAudioEncoder(**{**whisper.options, "feature_layer": 1})
    layer1.load_state_dict(whisper.state_dict())
    pooled = WhisperAudioEncoder(**{**whisper.options, "pool_stride": 3, "trim_to_input": True})
    pooled.load_state_dict(whisper.state_dict())
    mel = WhisperFeatureExtractor(feature_size=16)(list(waves.numpy()), sampling_rate=16000, max_length=16000,
                                                   return_tensors="pt").input_features
    with torch.no_grad():
        hidden = whisper.model(mel, output_hidden_states=True).hidden_states
        torch.testing.assert_close(layer1.eval()(waves), hidden[1])
        trimmed = pooled.eval()(waves)
    assert trimmed.shape == (2, 5, 32)  # ceil(13 / 3)
    torch.testing.assert_close(trimmed[:, 0], hidden[-1][:, 0:3].mean(1))
    torch.testing.assert_close(trimmed[:, -1], hidden[-1][:, 12])  # the partial last window averages what it has


def test_whisper_rebuilds_from_options(whisper: WhisperAudioEncoder) -> None:
    copy = build_encoder("whisper-audio", whisper.options)
    copy.load_state_dict(whisper.state_dict())
    assert_equivalent(whisper, copy.eval(), _randn(2, 16000))
    assert_equivalent(whisper, rebuilt(whisper), _randn(2, 16000))


def test_whisper_loads_a_local_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(1)
    saved = WhisperForConditionalGeneration(WhisperConfig(**WHISPER)).eval()
    saved.save_pretrained(tmp_path / "whisper")
    encoder = WhisperAudioEncoder.from_pretrained(tmp_path / "whisper", pool_stride=2).eval()
    waves = _randn(2, 16000)
    mel = WhisperFeatureExtractor(feature_size=16)(list(waves.numpy()), sampling_rate=16000, max_length=16000,
                                                   return_tensors="pt").input_features
    with torch.no_grad():
        expected = saved.model.encoder(mel).last_hidden_state
        torch.testing.assert_close(encoder(waves), expected.unflatten(1, (25, 2)).mean(2))
    assert encoder.options["pool_stride"] == 2 and "path" not in encoder.options


def test_whisper_refuses_what_is_not_a_whisper_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="cannot read a local Whisper config"):
        WhisperAudioEncoder.from_pretrained(tmp_path / "missing")
    CLIPModel(CLIPConfig(text_config=TEXT, vision_config=CLIP_VISION, projection_dim=16)).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match=r"not a Whisper checkpoint \(model_type 'clip'\)"):
        WhisperAudioEncoder.from_pretrained(tmp_path)
    WhisperEncoder(WhisperConfig(**WHISPER)).save_pretrained(tmp_path / "bare")  # other names: would load nothing
    with pytest.raises(CheckpointError, match=r"weights missing \(first: encoder\."):
        WhisperAudioEncoder.from_pretrained(tmp_path / "bare")


# --- CLAP ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clap() -> CLAPAudioEncoder:
    torch.manual_seed(0)
    return CLAPAudioEncoder(CLAP_AUDIO, feature_extractor=CLAP_FEATURES).eval()


def test_clap_token_views(clap: CLAPAudioEncoder) -> None:
    waves = _randn(2, 16000)
    with torch.no_grad():
        grid = clap.model(**clap.features(list(waves.numpy()), sampling_rate=16000, truncation="rand_trunc",
                                          return_tensors="pt")).last_hidden_state
        assert grid.shape == (2, 32, 2, 32)  # (n, width, F', T'): 64x64 "image", one patch merge, freq_ratio 4
        time = clap(waves)
        assert time.shape == (2, 32, 32) and clap.output_dim == 32
        torch.testing.assert_close(time, grid.mean(2).transpose(1, 2))
        views = {}
        for view in ("time-freq", "pooled"):
            other = CLAPAudioEncoder(**{**clap.options, "tokens": view})
            other.load_state_dict(clap.state_dict())
            views[view] = other.eval()(waves)
    assert views["time-freq"].shape == (2, 64, 32) and views["pooled"].shape == (2, 1, 32)
    torch.testing.assert_close(views["time-freq"][:, 0], grid[:, :, 0, 0])
    torch.testing.assert_close(views["time-freq"][:, 1], grid[:, :, 1, 0])  # time-major: both rows of step 0
    torch.testing.assert_close(views["pooled"][:, 0], grid.flatten(2).mean(-1))


def test_clap_is_deterministic_for_long_inputs_and_rebuilds(clap: CLAPAudioEncoder) -> None:
    waves = _randn(2, 24000)
    with torch.no_grad():
        torch.testing.assert_close(clap(waves), clap(waves[:, :16000]))  # cut to the start, not a random crop
    assert_equivalent(clap, rebuilt(clap), _randn(2, 16000))


def test_clap_fusion_model_uses_true_is_longer() -> None:
    torch.manual_seed(0)
    fused = CLAPAudioEncoder({**CLAP_AUDIO, "num_mel_bins": 64, "enable_fusion": True, "fusion_type": "aff_2d"},
                             feature_extractor={**CLAP_FEATURES, "hop_length": 320, "fft_window_size": 512}).eval()
    waves = _randn(3, 16000)
    with torch.no_grad():
        first = fused(waves)
        assert first.shape == (3, 8, 32)  # 64 mel bins -> freq_ratio 1: (8 x 8) grid, mean over 8 rows
        torch.testing.assert_close(first, fused(waves))  # the extractor alone would flag a random sample
        assert fused(_randn(3, 40000)).shape == (3, 8, 32)  # longer: local crops fused in
    with pytest.raises(ValueError, match="fusion needs 64 mel bins"):
        CLAPAudioEncoder({**CLAP_AUDIO, "enable_fusion": True, "fusion_type": "aff_2d"})


def test_clap_loads_a_local_clap_checkpoint_with_its_preprocessor(tmp_path: Path) -> None:
    torch.manual_seed(1)
    saved = ClapModel(ClapConfig(text_config={**TEXT, "projection_dim": 16}, audio_config=CLAP_AUDIO,
                                 projection_dim=16)).eval()
    saved.save_pretrained(tmp_path)
    ClapFeatureExtractor(feature_size=16, **CLAP_FEATURES).save_pretrained(tmp_path)
    encoder = CLAPAudioEncoder.from_pretrained(tmp_path, tokens="pooled").eval()
    assert encoder.options["feature_extractor"]["sampling_rate"] == 16000
    assert encoder.options["feature_extractor"]["max_length_s"] == 1
    waves = _randn(2, 16000)
    features = encoder.features(list(waves.numpy()), sampling_rate=16000, truncation="rand_trunc",
                                return_tensors="pt")
    with torch.no_grad():
        expected = saved.audio_model(**features).pooler_output
        torch.testing.assert_close(encoder(waves)[:, 0], expected)
    assert_equivalent(encoder, rebuilt(encoder), waves)
    with pytest.raises(CheckpointError, match="not a CLAP checkpoint"):
        CLAPAudioEncoder.from_pretrained(_save_whisper(tmp_path / "whisper"))


def _save_whisper(directory: Path) -> Path:
    WhisperForConditionalGeneration(WhisperConfig(**WHISPER)).save_pretrained(directory)
    return directory
