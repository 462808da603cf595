"""BEATs (Microsoft, "Audio Pre-Training with Acoustic Tokenizers"), the audio encoder of the released ModelCompose
audio model, and its Kaldi log-mel filterbank processor.

Written from the published architecture and checkpoint format; the parameter names are the released
checkpoint's (`BEATs_iter3_plus_AS2M.pt` holds `{"cfg": {...}, "model": state_dict}`), so its weights load
without renaming. The features are what the official `BeatsAudioEncoder` wrapper hands to its projector: the
last layer's output, `(n, 512, encoder_embed_dim)` for a 10.24 s window (1024 frames / 16 x 128 / 16 patches).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mmcompose.errors import CheckpointError, InputError
from mmcompose.files import read_json
from mmcompose.io import load_audio
from mmcompose.modalities._local import load_strict
from mmcompose.tensorfiles import load_pickle, read_tensors

#: Architecture fields of `BEATsConfig` that change the computation (the rest are training-time switches).
BEATS_DEFAULTS: dict[str, Any] = dict(
    input_patch_size=16, embed_dim=512, conv_bias=False, encoder_layers=12, encoder_embed_dim=768,
    encoder_ffn_embed_dim=3072, encoder_attention_heads=12, activation_fn="gelu", layer_norm_first=False,
    deep_norm=True, conv_pos=128, conv_pos_groups=16, relative_position_embedding=True, num_buckets=320,
    max_distance=800, gru_rel_pos=True, finetuned_model=False,
)

# --- Kaldi filterbank ----------------------------------------------------------------------------------------

#: Normalisation the official BEATs processor applies to the log-mel filterbank: (fbank - mean) / (2 * std).
FBANK_MEAN = 15.41663
FBANK_STD = 6.55582


def _mel(freq: torch.Tensor | float) -> torch.Tensor | float:
    if isinstance(freq, torch.Tensor):
        return 1127.0 * (1.0 + freq / 700.0).log()
    return 1127.0 * math.log(1.0 + freq / 700.0)


def kaldi_mel_banks(num_bins: int, fft_size: int, sample_rate: int, low_freq: float = 20.0,
                    high_freq: float = 0.0) -> torch.Tensor:
    """Kaldi's triangular mel filters, `(num_bins, fft_size // 2 + 1)`, the Nyquist column zero (as Kaldi).

    `high_freq <= 0` counts down from Nyquist. With 128 bins and a 512-point FFT at 16 kHz some low filters
    contain no FFT bin at all; their energy is 0 and their log is the floor, exactly as in Kaldi.
    """
    nyquist = 0.5 * sample_rate
    high = high_freq if high_freq > 0 else nyquist + high_freq
    mel_low, mel_high = _mel(low_freq), _mel(high)
    delta = (mel_high - mel_low) / (num_bins + 1)
    index = torch.arange(num_bins).unsqueeze(1)
    left, centre, right = mel_low + index * delta, mel_low + (index + 1.0) * delta, mel_low + (index + 2.0) * delta
    mel = _mel((sample_rate / fft_size) * torch.arange(fft_size // 2)).unsqueeze(0)
    up, down = (mel - left) / (centre - left), (right - mel) / (right - centre)
    banks = torch.clamp(torch.minimum(up, down), min=0.0)
    return F.pad(banks, (0, 1))


def kaldi_fbank(wave: torch.Tensor, *, num_mel_bins: int = 128, sample_rate: int = 16000,
                frame_length_ms: float = 25.0, frame_shift_ms: float = 10.0, preemphasis: float = 0.97,
                low_freq: float = 20.0, high_freq: float = 0.0) -> torch.Tensor:
    """Log-mel filterbank of a 1-D waveform, `(frames, num_mel_bins)`, equal to Kaldi's `compute-fbank-feats`
    (and torchaudio's `compliance.kaldi.fbank`) with: no dither, DC offset removed per frame, pre-emphasis,
    Povey window, FFT size rounded up to a power of two, power spectrum, log floored at float32 epsilon,
    `snip_edges` (frames = 1 + (N - window) // shift). The waveform's scale is kept (Kaldi expects int16 range).
    """
    window = int(sample_rate * frame_length_ms / 1000)
    shift = int(sample_rate * frame_shift_ms / 1000)
    if wave.dim() != 1 or wave.numel() < window:
        raise ValueError(f"need a 1-D waveform of at least {window} samples, got shape {tuple(wave.shape)}")
    fft_size = 1 << (window - 1).bit_length()
    count = 1 + (wave.numel() - window) // shift
    frames = wave.as_strided((count, window), (shift, 1))
    frames = frames - frames.mean(dim=1, keepdim=True)
    previous = torch.cat([frames[:, :1], frames[:, :-1]], dim=1)
    frames = frames - preemphasis * previous
    povey = torch.hann_window(window, periodic=False, dtype=wave.dtype).pow(0.85)
    frames = F.pad(frames * povey, (0, fft_size - window))
    power = torch.fft.rfft(frames).abs().pow(2.0)
    banks = kaldi_mel_banks(num_mel_bins, fft_size, sample_rate, low_freq, high_freq).to(wave.dtype)
    energies = power @ banks.T
    return torch.clamp(energies, min=torch.finfo(wave.dtype).eps).log()


class BeatsFbankProcessor:
    """Any audio input -> float32 `(target_frames, 128)`: BEATs' input for ONE clip.

    Decoding (any rate, any channel count -> 16 kHz mono in [-1, 1]) is `mmcompose.io.load_audio`. Then, as the
    official `BeatsAudioProcessor`: scale by 2**15, Kaldi fbank (128 bins, 25 ms window, 10 ms shift),
    normalise with `(x - 15.41663) / (2 * 6.55582)`, then zero rows appended AFTER normalisation up to
    `target_frames` (1024 = 10.24 s) or the clip cut there. As in the official data path no padding mask is
    kept: the encoder attends to the zero rows like real frames. A clip shorter than one 25 ms frame
    (400 samples) is refused.
    """

    sample_rate = 16000

    def __init__(self, target_frames: int = 1024, num_mel_bins: int = 128) -> None:
        self.target_frames, self.num_mel_bins = target_frames, num_mel_bins

    def __call__(self, source: Any) -> torch.Tensor:
        wave = load_audio(source, sample_rate=self.sample_rate)
        return self.from_wave(wave, name=str(source) if isinstance(source, str | Path) else "audio array")

    def from_wave(self, wave: np.ndarray | torch.Tensor, name: str = "audio array") -> torch.Tensor:
        """The processor's output for a 16 kHz mono float waveform already in memory."""
        wave = torch.as_tensor(wave, dtype=torch.float32)
        minimum = int(self.sample_rate * 0.025)
        if wave.numel() < minimum:
            raise InputError(f"{name}: {wave.numel()} samples is shorter than one 25 ms filterbank frame "
                             f"({minimum} samples at {self.sample_rate} Hz)")
        fbank = kaldi_fbank(wave * 32768.0, num_mel_bins=self.num_mel_bins, sample_rate=self.sample_rate)
        fbank = (fbank - FBANK_MEAN) / (2 * FBANK_STD)
        fbank = fbank[: self.target_frames]
        return F.pad(fbank, (0, 0, 0, self.target_frames - fbank.shape[0]))


# --- the encoder ---------------------------------------------------------------------------------------------


class _WeightNormConv(nn.Module):
    """A grouped Conv1d whose weight is stored as BEATs stores it: `weight_v` and a gain `weight_g` over dim 2,
    weight = v * g / |v| (norm over every dim but 2). Kept as two plain parameters, not torch's weight-norm
    parametrization, so the state-dict names are the released ones."""

    def __init__(self, width: int, kernel: int, groups: int) -> None:
        super().__init__()
        self.padding, self.groups = kernel // 2, groups
        self.weight_g = nn.Parameter(torch.ones(1, 1, kernel))
        self.weight_v = nn.Parameter(torch.randn(width, width // groups, kernel) * 0.02)
        self.bias = nn.Parameter(torch.zeros(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm = self.weight_v.pow(2).sum(dim=(0, 1), keepdim=True).sqrt()
        weight = self.weight_v * (self.weight_g / norm)
        return F.conv1d(x, weight, self.bias, padding=self.padding, groups=self.groups)


class _RelativeAttention(nn.Module):
    """Multi-head self-attention with BEATs' bucketed relative position bias and its GRU-style per-head gate.

    The official code scales q by head_dim^-0.5 / 32, subtracts each row's maximum and multiplies by 32; that
    is the plain softmax(q k^T / sqrt(d)) up to rounding, which is what this computes.
    """

    def __init__(self, width: int, heads: int, relative: bool, gated: bool, num_buckets: int,
                 max_distance: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, width // heads
        self.num_buckets, self.max_distance, self.gated = num_buckets, max_distance, gated
        self.q_proj, self.k_proj = nn.Linear(width, width), nn.Linear(width, width)
        self.v_proj, self.out_proj = nn.Linear(width, width), nn.Linear(width, width)
        if relative:
            self.relative_attention_bias = nn.Embedding(num_buckets, heads)
        if gated:
            self.grep_linear = nn.Linear(self.head_dim, 8)
            self.grep_a = nn.Parameter(torch.ones(1, heads, 1, 1))

    def position_bias(self, length: int) -> torch.Tensor:
        """`(heads, length, length)` bias from the bidirectional bucketed distance key - query."""
        position = torch.arange(length)
        distance = position.unsqueeze(0) - position.unsqueeze(1)
        half = self.num_buckets // 2
        buckets = (distance > 0).long() * half
        distance = distance.abs()
        exact = half // 2
        large = exact + (torch.log(distance.float() / exact) / math.log(self.max_distance / exact)
                         * (half - exact)).long()
        large = torch.clamp(large, max=half - 1)
        buckets = buckets + torch.where(distance < exact, distance, large)
        return self.relative_attention_bias(buckets.to(self.relative_attention_bias.weight.device)).permute(2, 0, 1)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None, key_padding: torch.Tensor | None) -> torch.Tensor:
        batch, length, width = x.shape
        split = (batch, length, self.heads, self.head_dim)
        q = self.q_proj(x).view(split).transpose(1, 2)
        k = self.k_proj(x).view(split).transpose(1, 2)
        v = self.v_proj(x).view(split).transpose(1, 2)
        mask = torch.zeros(batch, 1, 1, length, dtype=x.dtype, device=x.device)
        if key_padding is not None:
            mask = mask.masked_fill(key_padding.view(batch, 1, 1, length), float("-inf"))
        if bias is not None:
            if self.gated:
                gates = torch.sigmoid(self.grep_linear(q).view(batch, self.heads, length, 2, 4).sum(-1))
                gate_a, gate_b = gates.chunk(2, dim=-1)
                bias = (gate_a * (gate_b * self.grep_a - 1.0) + 2.0) * bias
            mask = mask + bias
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, width))


class _Layer(nn.Module):
    """Post-LayerNorm block; with deep_norm each residual is scaled by (2 * layers)^(1/4) before the add."""

    def __init__(self, cfg: dict[str, Any], relative: bool) -> None:
        super().__init__()
        width = cfg["encoder_embed_dim"]
        self.alpha = math.pow(2.0 * cfg["encoder_layers"], 0.25) if cfg["deep_norm"] else 1.0
        self.layer_norm_first = cfg["layer_norm_first"]
        self.self_attn = _RelativeAttention(width, cfg["encoder_attention_heads"], relative, cfg["gru_rel_pos"],
                                            cfg["num_buckets"], cfg["max_distance"])
        self.self_attn_layer_norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, cfg["encoder_ffn_embed_dim"])
        self.fc2 = nn.Linear(cfg["encoder_ffn_embed_dim"], width)
        self.final_layer_norm = nn.LayerNorm(width)

    def _ffn(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x).float()).to(x.dtype))  # BEATs evaluates its GELU in float32

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None, key_padding: torch.Tensor | None) -> torch.Tensor:
        if self.layer_norm_first:
            x = x + self.self_attn(self.self_attn_layer_norm(x), bias, key_padding)
            return x + self._ffn(self.final_layer_norm(x))
        x = self.self_attn_layer_norm(x * self.alpha + self.self_attn(x, bias, key_padding))
        return self.final_layer_norm(x * self.alpha + self._ffn(x))


class _Encoder(nn.Module):
    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        width = cfg["encoder_embed_dim"]
        self.pos_conv = nn.ModuleList([_WeightNormConv(width, cfg["conv_pos"], cfg["conv_pos_groups"])])
        self.even_kernel = cfg["conv_pos"] % 2 == 0
        self.layer_norm = nn.LayerNorm(width)
        self.layer_norm_first = cfg["layer_norm_first"]
        relative = cfg["relative_position_embedding"]
        self.layers = nn.ModuleList(_Layer(cfg, relative) for _ in range(cfg["encoder_layers"]))

    def forward(self, x: torch.Tensor, key_padding: torch.Tensor | None) -> torch.Tensor:
        if key_padding is not None:
            x = x.masked_fill(key_padding.unsqueeze(-1), 0.0)
        conv = self.pos_conv[0](x.transpose(1, 2))
        if self.even_kernel:  # "same" padding for an even kernel yields one step too many; drop the last
            conv = conv[..., :-1]
        x = x + F.gelu(conv).transpose(1, 2)
        if not self.layer_norm_first:
            x = self.layer_norm(x)
        bias = None
        first = self.layers[0].self_attn
        if hasattr(first, "relative_attention_bias"):
            bias = first.position_bias(x.shape[1]).unsqueeze(0).to(x.dtype)
        for layer in self.layers:
            x = layer(x, bias, key_padding)
        if self.layer_norm_first:
            x = self.layer_norm(x)
        return x


class BEATsEncoder(nn.Module):
    """BEATs: `(n, frames, 128)` normalised fbank (from `BeatsFbankProcessor`) -> `(n, tokens, encoder_embed_dim)`.

    16x16 patches over (time, frequency) -> LayerNorm -> linear to the encoder width -> convolutional position
    embedding -> transformer with relative position bias. Tokens are ordered time-patch-major
    (token = time_patch * (128 / 16) + freq_patch). Options: `cfg`, the checkpoint's `BEATsConfig` fields.

    Where this differs from the official module: the relative-position table is computed once from layer 0
    and reused by every layer, as the official code does, but each layer keeps its own copy of the table
    rather than sharing one tensor (the released checkpoint stores identical copies; tied tensors cannot be
    written to safetensors). Only layer 0's copy is read. Dropout and layer drop are training-only and absent:
    the released encoder is frozen.
    """

    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        full = {**BEATS_DEFAULTS, **{k: v for k, v in cfg.items() if k in BEATS_DEFAULTS}}
        if full["finetuned_model"]:
            raise ValueError("fine-tuned BEATs classifiers (finetuned_model=True) are not supported; use a "
                             "pre-trained checkpoint such as BEATs_iter3_plus_AS2M")
        self.options = dict(cfg=full)
        self.output_dim = full["encoder_embed_dim"]
        patch = full["input_patch_size"]
        self.patch_embedding = nn.Conv2d(1, full["embed_dim"], patch, stride=patch, bias=full["conv_bias"])
        self.layer_norm = nn.LayerNorm(full["embed_dim"])
        self.post_extract_proj = (nn.Linear(full["embed_dim"], full["encoder_embed_dim"])
                                  if full["embed_dim"] != full["encoder_embed_dim"] else None)
        self.encoder = _Encoder(full)

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> BEATsEncoder:
        """Load a released BEATs `.pt` (`{"cfg", "model"}`, read with `weights_only=True`) or a directory with
        `config.json` (`beats_cfg` or top-level BEATs fields) and `weights.safetensors` / `model.safetensors`.
        Missing, unexpected or misshapen weights are a one-line `CheckpointError` naming the file."""
        cfg, weights, source = _read_beats(Path(path))
        try:
            encoder = cls(cfg)
        except (ValueError, KeyError, TypeError) as error:
            raise CheckpointError(f"{source}: bad BEATs config ({error})") from None
        load_strict(encoder, weights, source, "BEATs")
        return encoder.eval()

    def forward(self, fbank: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """`padding_mask` (n, frames), True = padding, as the official encoder takes it; the official data path
        passes none (all False), which is the default here."""
        dtype = self.patch_embedding.weight.dtype
        patches = self.patch_embedding(fbank.to(dtype).unsqueeze(1))
        tokens = self.layer_norm(patches.flatten(2).transpose(1, 2))
        key_padding = None
        if padding_mask is not None:
            # official reduction: consecutive frames grouped per token, whatever the (time, freq) layout
            extra = padding_mask.shape[1] % tokens.shape[1]
            if extra:
                padding_mask = padding_mask[:, :-extra]
            key_padding = padding_mask.view(padding_mask.shape[0], tokens.shape[1], -1).all(-1)
        if self.post_extract_proj is not None:
            tokens = self.post_extract_proj(tokens)
        return self.encoder(tokens, key_padding)

    def valid_mask(self, padding_mask: torch.Tensor, num_tokens: int) -> torch.Tensor:
        """The official wrapper's second output: True for tokens that are not padding."""
        extra = padding_mask.shape[1] % num_tokens
        mask = padding_mask[:, :-extra] if extra else padding_mask
        return ~mask.view(mask.shape[0], num_tokens, -1).all(-1)


def _read_beats(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], str]:
    """(cfg, state dict, file name for messages) of a released `.pt` or a config.json + safetensors directory."""
    if path.is_dir():
        config_file = path / "config.json"
        if not config_file.is_file():
            raise CheckpointError(f"{path}: no config.json (a BEATs directory needs config.json and weights)")
        config = read_json(config_file)
        cfg = config.get("beats_cfg", config.get("cfg", config))
        weights_file = next((path / name for name in ("weights.safetensors", "model.safetensors")
                             if (path / name).is_file()), None)
        if weights_file is None:
            raise CheckpointError(f"{path}: no weights.safetensors or model.safetensors")
        return cfg, read_tensors([weights_file]), str(weights_file)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such BEATs checkpoint")
    loaded = load_pickle(path)
    if not isinstance(loaded, dict) or not isinstance(loaded.get("cfg"), dict) or not isinstance(
            loaded.get("model"), dict):
        raise CheckpointError(f"{path}: not a BEATs checkpoint (expected a dict with 'cfg' and 'model')")
    return loaded["cfg"], loaded["model"], str(path)


__all__ = ["BEATsEncoder", "BeatsFbankProcessor", "kaldi_fbank", "kaldi_mel_banks"]
