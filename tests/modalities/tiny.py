"""Tiny random configurations of the real encoders (no downloads), shared by the modality tests."""

from __future__ import annotations

import json
from typing import Any

import torch
from torch import nn

CLIP_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, image_size=16,
                   patch_size=8, projection_dim=16)
# max_source_positions 50 -> a 1 s window (100 mel frames) instead of Whisper's 30 s.
WHISPER = dict(d_model=32, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=64, decoder_layers=1,
               decoder_attention_heads=2, decoder_ffn_dim=64, num_mel_bins=16, max_source_positions=50)
# spec_size 64 with 16 mel bins: freq_ratio 4, as in the released 256 / 64 configuration.
CLAP_AUDIO = dict(spec_size=64, num_mel_bins=16, window_size=4, hidden_size=32, projection_dim=16, depths=[1, 1],
                  num_attention_heads=[2, 2], patch_embeds_hidden_size=16)
CLAP_FEATURES = dict(sampling_rate=16000, hop_length=160, max_length_s=1, fft_window_size=256, frequency_max=8000)
POINT_BERT = dict(trans_dim=32, depth=2, num_heads=2, group_size=8, num_group=16, encoder_dims=24)


def rebuilt(module: nn.Module) -> nn.Module:
    """A module of the same type from `module.options` after a JSON round trip (as a checkpoint manifest stores
    them), with `module`'s weights, in eval mode."""
    copy = type(module)(**json.loads(json.dumps(module.options)))
    copy.load_state_dict(module.state_dict())
    return copy.eval()


def assert_equivalent(first: nn.Module, second: nn.Module, inputs: torch.Tensor, **tolerance: Any) -> None:
    ours, theirs = first.state_dict(), second.state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    with torch.no_grad():
        torch.testing.assert_close(first(inputs), second(inputs), **tolerance)
