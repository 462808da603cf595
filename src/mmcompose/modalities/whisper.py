"""Whisper's audio encoder behind the plug-in interface (`whisper-audio`)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperModel
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from mmcompose.modalities._local import device_of, load_local_part, local_model_type


class WhisperAudioEncoder(nn.Module):
    """transformers' `WhisperEncoder`: `(n, samples)` mono 16 kHz waveform -> `(n, tokens, d_model)`.

    Log-mel features come from transformers' `WhisperFeatureExtractor`, built from Whisper's fixed parameters
    (16 kHz, n_fft 400, hop 160, `num_mel_bins` from the config) rather than downloaded. It runs batched (one
    batched STFT) and clamps each sample's dynamic range on its own, so features do not depend on the batch.

    Window length, the trade-off: the encoder only accepts exactly `2 * max_source_positions` mel frames, so
    every input is padded (or truncated) to `n_samples = 2 * max_source_positions * 160` samples -- 30 s for
    the real models (1500 positions). A 1 s clip therefore costs as much as 30 s and yields 1500 tokens, mostly
    silence; `trim_to_input=True` keeps only the tokens that cover the input (50 per second; the padding still
    influences them through attention, as in Whisper itself), and `pool_stride` averages groups of that many
    tokens. Tiny test configs use `max_source_positions=50`, i.e. a 1 s window. Longer inputs are truncated.

    `feature_layer` indexes the encoder's hidden states: 0 is the convolution stem plus positions, `i` the
    output of layer `i`, and -1 (the default) the final output after the encoder's LayerNorm, which is what
    Whisper's decoder reads and what audio LLMs built on Whisper use.

    tokens = `max_source_positions` (or `ceil(samples / 320)` with `trim_to_input`), then
    `ceil(tokens / pool_stride)`.
    """

    sampling_rate = 16000
    hop_length = 160

    def __init__(self, config: dict[str, Any], feature_layer: int = -1, pool_stride: int = 1,
                 trim_to_input: bool = False) -> None:
        super().__init__()
        if pool_stride < 1:
            raise ValueError(f"pool_stride must be >= 1, got {pool_stride}")
        self.options = dict(config=config, feature_layer=feature_layer, pool_stride=pool_stride,
                            trim_to_input=trim_to_input)
        self.model = WhisperEncoder(WhisperConfig(**config))
        self.output_dim = self.model.config.d_model
        self.feature_layer, self.pool_stride, self.trim_to_input = feature_layer, pool_stride, trim_to_input
        self.positions = self.model.config.max_source_positions
        self.n_samples = 2 * self.positions * self.hop_length
        self.features = WhisperFeatureExtractor(feature_size=self.model.config.num_mel_bins,
                                                sampling_rate=self.sampling_rate, hop_length=self.hop_length,
                                                n_fft=400)

    @classmethod
    def from_pretrained(cls, path: str | Path, **options: Any) -> WhisperAudioEncoder:
        """The encoder of a local Whisper checkpoint (`WhisperModel` or `WhisperForConditionalGeneration`);
        the decoder is loaded too, then dropped."""
        local_model_type(path, "Whisper", ("whisper",))
        whisper = load_local_part(WhisperModel, path, "encoder.", "Whisper")
        encoder = cls(whisper.config.to_dict(), **options)
        encoder.model.load_state_dict(whisper.encoder.state_dict())
        return encoder

    def forward(self, waves: torch.Tensor) -> torch.Tensor:
        batch = list(waves.detach().float().cpu().numpy())
        mel = self.features(batch, sampling_rate=self.sampling_rate, max_length=self.n_samples,
                            padding="max_length", truncation=True, return_tensors="pt").input_features
        output = self.model(mel.to(device_of(self), self.model.dtype), output_hidden_states=self.feature_layer != -1)
        tokens = output.last_hidden_state if self.feature_layer == -1 else output.hidden_states[self.feature_layer]
        if self.trim_to_input:
            tokens = tokens[:, : min(self.positions, math.ceil(waves.shape[-1] / (2 * self.hop_length)))]
        if self.pool_stride > 1:
            tokens = F.avg_pool1d(tokens.transpose(1, 2), self.pool_stride, self.pool_stride,
                                  ceil_mode=True).transpose(1, 2)
        return tokens
