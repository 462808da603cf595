"""CLAP's audio encoder (HTSAT) behind the plug-in interface (`clap-audio`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from transformers import ClapAudioConfig, ClapAudioModel, ClapFeatureExtractor, ClapModel

from mmcompose.modalities._local import device_of, load_local_part, local_model_type


class CLAPAudioEncoder(nn.Module):
    """transformers' `ClapAudioModel` (HTSAT): `(n, samples)` mono waveform at `feature_extractor`'s
    `sampling_rate` (48 kHz for the released CLAP models; set the audio processor to match) ->
    `(n, tokens, width)`, where width is `patch_embeds_hidden_size * 2 ** (len(depths) - 1)` (768 released).

    The audio model's last hidden state has shape `(n, width, F', T')`: HTSAT folds the mel spectrogram into a
    square image, and transformers unfolds it back so T' runs in time order over the clip (for the released
    config: 10 s -> F' = 2 frequency rows x T' = 32 time steps). `tokens` picks the view:
    "time" averages the frequency rows (T' tokens, 32), "time-freq" keeps both, time-major (T' * F' tokens, 64),
    "pooled" is the CLAP audio embedding before its projection (1 token).

    Features come from transformers' `ClapFeatureExtractor`, built from `feature_extractor` (its keyword
    arguments: `sampling_rate`, `hop_length`, `max_length_s`, `fft_window_size`, `frequency_min`,
    `frequency_max`, `padding`, ...; `feature_size` is always the config's `num_mel_bins`). It loops over the
    batch in numpy. Deterministic by construction where the extractor is random:
    * unfused models: inputs longer than `max_length_s` are cut to their start (the extractor would crop
      at a random offset);
    * fused models (`enable_fusion`): `is_longer` is each input's true flag (the extractor marks a random
      sample when none is longer, a training device). Longer inputs still get the extractor's random
      local crops, as in CLAP; give clips of at most `max_length_s` for deterministic output. Fusion needs
      64 mel bins (the extractor's global view is resized to 64 bins).
    """

    def __init__(self, config: dict[str, Any], tokens: Literal["time", "time-freq", "pooled"] = "time",
                 feature_extractor: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.options = dict(config=config, tokens=tokens, feature_extractor=feature_extractor)
        self.model = ClapAudioModel(ClapAudioConfig(**config))
        audio = self.model.config
        if audio.enable_fusion and audio.num_mel_bins != 64:
            raise ValueError(f"CLAP fusion needs 64 mel bins (the extractor's global view has 64), got "
                             f"{audio.num_mel_bins}")
        self.output_dim = int(audio.patch_embeds_hidden_size * 2 ** (len(audio.depths) - 1))
        self.tokens, self.fusion = tokens, bool(audio.enable_fusion)
        self.features = ClapFeatureExtractor(**{**(feature_extractor or {}), "feature_size": audio.num_mel_bins})

    @classmethod
    def from_pretrained(cls, path: str | Path, **options: Any) -> CLAPAudioEncoder:
        """The audio tower of a local CLAP checkpoint (`ClapModel` or `ClapAudioModel`); the feature
        extractor's parameters are read from its `preprocessor_config.json` when present and not given."""
        if local_model_type(path, "CLAP", ("clap", "clap_audio_model")) == "clap":
            audio = load_local_part(ClapModel, path, "audio_model.", "CLAP").audio_model
        else:
            audio = load_local_part(ClapAudioModel, path, "", "CLAP audio")
        if "feature_extractor" not in options and (Path(path) / "preprocessor_config.json").is_file():
            saved = ClapFeatureExtractor.from_pretrained(path, local_files_only=True)
            options["feature_extractor"] = {key: getattr(saved, key) for key in (
                "sampling_rate", "hop_length", "fft_window_size", "frequency_min", "frequency_max", "top_db",
                "padding") if getattr(saved, key, None) is not None}
            options["feature_extractor"]["max_length_s"] = saved.nb_max_samples / saved.sampling_rate
        encoder = cls(audio.config.to_dict(), **options)
        encoder.model.load_state_dict(audio.state_dict())
        return encoder

    def forward(self, waves: torch.Tensor) -> torch.Tensor:
        limit = round(self.features.nb_max_samples)  # a float when max_length_s is
        longer = waves.shape[-1] > limit
        if not self.fusion:
            waves = waves[..., :limit]
        batch = list(waves.detach().float().cpu().numpy())
        features = self.features(batch, sampling_rate=self.features.sampling_rate, max_length=limit,
                                 truncation="fusion" if self.fusion else "rand_trunc",
                                 return_tensors="pt").input_features
        is_longer = torch.full((len(batch), 1), longer, dtype=torch.bool, device=device_of(self))
        output = self.model(features.to(device_of(self), self.model.dtype), is_longer=is_longer)
        if self.tokens == "pooled":
            return output.pooler_output.unsqueeze(1)
        grid = output.last_hidden_state.permute(0, 3, 2, 1)  # (n, T', F', width)
        return grid.mean(2) if self.tokens == "time" else grid.flatten(1, 2)
