"""The real encoders inside a `MultimodalLLM`: raw inputs through their processors, one forward with the
documented token counts, and a checkpoint round trip (options through the JSON manifest, tensors back)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from mmcompose.checkpoint import load_checkpoint, save_checkpoint
from mmcompose.model import Component, MultimodalLLM, modality_spec
from tests.modalities.tiny import CLAP_AUDIO, CLAP_FEATURES, CLIP_VISION, POINT_BERT, WHISPER

AUDIO = {
    "whisper-audio": (Component(type="whisper-audio", options=dict(config=WHISPER, pool_stride=2)), 25),
    "clap-audio": (Component(type="clap-audio", options=dict(config=CLAP_AUDIO, feature_extractor=CLAP_FEATURES)),
                   32),
}


@pytest.mark.parametrize("audio", sorted(AUDIO))
def test_real_encoders_in_a_multimodal_llm(llama_base: Path, tmp_path: Path, audio: str) -> None:
    audio_encoder, audio_tokens = AUDIO[audio]
    clip = dict(mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD)
    specs = [
        modality_spec("image", encoder=Component(type="clip-vision", options=dict(config=CLIP_VISION)),
                      processor=Component(type="clip-image", options=dict(size=16)), num_prefix_tokens=1),
        modality_spec("video", encoder=Component(type="clip-vision", options=dict(config=CLIP_VISION,
                                                                                  frame_pooling="mean")),
                      processor=Component(type="video", options=dict(num_frames=2, size=16, **clip))),
        modality_spec("audio", encoder=audio_encoder,
                      processor=Component(type="audio", options=dict(sample_rate=16000, num_samples=16000))),
        modality_spec("point", encoder=Component(type="point-bert", options=POINT_BERT),
                      processor=Component(type="point", options=dict(num_points=64))),
    ]
    torch.manual_seed(0)
    model = MultimodalLLM.from_base(llama_base, specs, strategy="decoupled", rank=2, alpha=4.0).eval()
    rng = np.random.default_rng(0)
    inputs = {
        "image": [rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)],
        "video": [rng.integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)],
        "audio": [rng.uniform(-0.5, 0.5, 12000).astype(np.float32)],
        "point": [rng.normal(size=(100, 3)).astype(np.float32)],
    }
    example = model.example("USER: <image> <video> <audio> <point> what is it? ASSISTANT:", inputs, target=" a")
    batch = model.assemble([example])
    routes = model.spec.route_ids()
    expected = {"image": 1 + 4, "video": 4, "audio": audio_tokens, "point": POINT_BERT["num_group"] + 1}
    assert {name: int((batch.routes == routes[name]).sum()) for name in expected} == expected
    with torch.no_grad():
        output = model(batch)
        assert torch.isfinite(output.loss)
        reloaded = load_checkpoint(save_checkpoint(model, tmp_path / "model")).eval()
        torch.testing.assert_close(reloaded(batch).logits, output.logits)
