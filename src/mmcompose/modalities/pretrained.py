"""Real encoders behind the plug-in interface: Whisper and CLAP audio, a Point-BERT point encoder, and the CLIP
image processor.

Every encoder builds from a config (random weights, what the tests use) and keeps in `options` only what rebuilds
its architecture, never a path: a checkpoint stores the encoder's tensors, so rebuilding must not depend on the
original files. Pretrained weights come from LOCAL files only (`from_pretrained` / `from_state_dict_file`);
nothing is ever downloaded. Missing weights are an error, never a silent random initialisation.

Pretrained encoders contain BatchNorm (CLAP, Point-BERT) and dropout (CLAP): run them in `eval()` mode, as the
official models do, or their outputs (and running statistics) change.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from transformers import (
    AutoConfig,
    ClapAudioConfig,
    ClapAudioModel,
    ClapFeatureExtractor,
    ClapModel,
    PreTrainedModel,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperModel,
)
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from mmcompose.errors import CheckpointError
from mmcompose.io import load_image
from mmcompose.modalities.encoders import farthest_point_sample

try:  # transformers >= 5 names the PIL backend; plain CLIPImageProcessor would warn and fall back to it anyway
    from transformers import CLIPImageProcessorPil as _CLIPImageProcessor
except ImportError:  # transformers 4.x, where CLIPImageProcessor is the PIL/numpy implementation
    from transformers import CLIPImageProcessor as _CLIPImageProcessor


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _load_local_part(model_class: type[PreTrainedModel], path: str | Path, part: str, what: str) -> PreTrainedModel:
    """`model_class.from_pretrained(path)` from local files, refusing the result if any weight of the sub-module
    `part` (a key prefix, "" for all) was missing: transformers would otherwise initialise it randomly."""
    try:
        model, info = model_class.from_pretrained(path, local_files_only=True, output_loading_info=True)
    except (OSError, ValueError, KeyError) as error:
        raise CheckpointError(f"{path}: cannot load a local {what} checkpoint ({_first_line(error)})") from None
    missing = sorted(key for key in info["missing_keys"] if key.startswith(part))
    if missing:
        raise CheckpointError(f"{path}: not a {what} checkpoint, {len(missing)} weights missing "
                              f"(first: {missing[0]})")
    return model


def _model_type(path: str | Path, what: str, allowed: tuple[str, ...]) -> str:
    """The `model_type` of a local checkpoint, checked before loading: transformers would try any config."""
    try:
        model_type = AutoConfig.from_pretrained(path, local_files_only=True).model_type
    except (OSError, ValueError, KeyError) as error:
        raise CheckpointError(f"{path}: cannot read a local {what} config ({_first_line(error)})") from None
    if model_type not in allowed:
        raise CheckpointError(f"{path}: not a {what} checkpoint (model_type {model_type!r})")
    return model_type


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


# --- Whisper ------------------------------------------------------------------------------------------------


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
        _model_type(path, "Whisper", ("whisper",))
        whisper = _load_local_part(WhisperModel, path, "encoder.", "Whisper")
        encoder = cls(whisper.config.to_dict(), **options)
        encoder.model.load_state_dict(whisper.encoder.state_dict())
        return encoder

    def forward(self, waves: torch.Tensor) -> torch.Tensor:
        batch = list(waves.detach().float().cpu().numpy())
        mel = self.features(batch, sampling_rate=self.sampling_rate, max_length=self.n_samples,
                            padding="max_length", truncation=True, return_tensors="pt").input_features
        output = self.model(mel.to(_device(self), self.model.dtype), output_hidden_states=self.feature_layer != -1)
        tokens = output.last_hidden_state if self.feature_layer == -1 else output.hidden_states[self.feature_layer]
        if self.trim_to_input:
            tokens = tokens[:, : min(self.positions, math.ceil(waves.shape[-1] / (2 * self.hop_length)))]
        if self.pool_stride > 1:
            tokens = F.avg_pool1d(tokens.transpose(1, 2), self.pool_stride, self.pool_stride,
                                  ceil_mode=True).transpose(1, 2)
        return tokens


# --- CLAP ---------------------------------------------------------------------------------------------------


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
        if _model_type(path, "CLAP", ("clap", "clap_audio_model")) == "clap":
            audio = _load_local_part(ClapModel, path, "audio_model.", "CLAP").audio_model
        else:
            audio = _load_local_part(ClapAudioModel, path, "", "CLAP audio")
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
        is_longer = torch.full((len(batch), 1), longer, dtype=torch.bool, device=_device(self))
        output = self.model(features.to(_device(self), self.model.dtype), is_longer=is_longer)
        if self.tokens == "pooled":
            return output.pooler_output.unsqueeze(1)
        grid = output.last_hidden_state.permute(0, 3, 2, 1)  # (n, T', F', width)
        return grid.mean(2) if self.tokens == "time" else grid.flatten(1, 2)


# --- Point-BERT ---------------------------------------------------------------------------------------------


class _GroupTokenizer(nn.Module):
    """Mini-PointNet per group: `(n, G, k, point_dims)` -> `(n, G, encoder_dims)`. Per-point 1x1 convs, a max
    over the group, the group maximum concatenated (first) to every point's features, more 1x1 convs, a max."""

    def __init__(self, point_dims: int, encoder_dims: int) -> None:
        super().__init__()
        self.encoder_dims = encoder_dims
        self.first_conv = nn.Sequential(nn.Conv1d(point_dims, 128, 1), nn.BatchNorm1d(128), nn.ReLU(),
                                        nn.Conv1d(128, 256, 1))
        self.second_conv = nn.Sequential(nn.Conv1d(512, 512, 1), nn.BatchNorm1d(512), nn.ReLU(),
                                         nn.Conv1d(512, encoder_dims, 1))

    def forward(self, groups: torch.Tensor) -> torch.Tensor:
        batch, num_groups, size, channels = groups.shape
        points = groups.reshape(batch * num_groups, size, channels).transpose(1, 2)
        local = self.first_conv(points)
        pooled = local.amax(dim=2, keepdim=True)
        features = self.second_conv(torch.cat([pooled.expand(-1, -1, size), local], dim=1))
        return features.amax(dim=2).reshape(batch, num_groups, self.encoder_dims)


class _Attention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(x).reshape(batch, length, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, length, width))


class _MLP(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, 4 * width)
        self.fc2 = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class _Block(nn.Module):
    """Pre-norm transformer block (no qkv bias, exact GELU, LayerNorm eps 1e-5)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = _Attention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = _MLP(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class _Blocks(nn.Module):
    """The block stack; Point-BERT adds the position embedding before every block, not only the first."""

    def __init__(self, width: int, depth: int, heads: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(_Block(width, heads) for _ in range(depth))

    def forward(self, x: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x + position)
        return x


class PointBERTEncoder(nn.Module):
    """A Point-BERT `PointTransformer`, the point encoder of PointLLM and ModelCompose, built from torch layers
    with the same parameter names and shapes, so their weights load: `(n, N, point_dims)` points (xyz, then
    rgb when `point_dims` is 6) -> `(n, num_group + 1, trans_dim)`, the CLS token first (`drop_cls` drops it),
    after the final LayerNorm -- all 513 tokens, as PointLLM (`use_max_pool: false`) and ModelCompose use it.

    Grouping: `num_group` centres by farthest-point sampling (from point 0, like pointnet2's CUDA kernel) on
    xyz, the `group_size` nearest points of each centre, xyz made relative to the centre (rgb kept as is).
    Each group -> mini-PointNet (`encoder`) -> `reduce_dim`; a CLS token; position = MLP of the centre xyz
    (`cls_pos` for CLS), added before every block; `depth` pre-norm blocks; final `norm`.

    Defaults are PointLLM v1.2 / ModelCompose's `PointTransformer_8192point_2layer.yaml`: trans_dim 384,
    depth 12, num_heads 6, group_size 32, num_group 512, encoder_dims 256 (inputs of 8192 points; ModelCompose
    sets point_dims 6). PointLLM v1.1 used `PointTransformer_base_8192point.yaml`: trans_dim 1152, num_heads
    12, group_size 48, encoder_dims 512. State-dict names and shapes (W = trans_dim, E = encoder_dims,
    C = point_dims; convs are 1x1 `Conv1d`, weights `(out, in, 1)`):

        encoder.first_conv.0.{weight (128, C, 1), bias}    encoder.first_conv.1.*  BatchNorm1d(128)
        encoder.first_conv.3.{weight (256, 128, 1), bias}
        encoder.second_conv.0.{weight (512, 512, 1), bias}  encoder.second_conv.1.* BatchNorm1d(512)
        encoder.second_conv.3.{weight (E, 512, 1), bias}
        reduce_dim.{weight (W, E), bias}     cls_token (1, 1, W)     cls_pos (1, 1, W)
        pos_embed.0.{weight (128, 3), bias}  pos_embed.2.{weight (W, 128), bias}
        blocks.blocks.{i}.norm1.*  .attn.qkv.weight (3W, W) (no bias)  .attn.proj.{weight (W, W), bias}
        blocks.blocks.{i}.norm2.*  .mlp.fc1.{weight (4W, W), bias}     .mlp.fc2.{weight (W, 4W), bias}
        norm.{weight, bias} (W)

    (BatchNorm entries: weight, bias, running_mean, running_var, num_batches_tracked.) Source of these facts:
    PointLLM's `pointllm/model/pointbert/{point_encoder.py,dvae.py,*.yaml}` and ModelCompose's
    `modelcompose/model/multimodal_encoder/point_encoder.py`, which loads a bare state dict with these names.
    """

    #: Prefixes tried, in order, by `from_state_dict_file(prefix="auto")`: a bare state dict (ModelCompose's
    #: point_bert_v1.2.pt), a Point-BERT training checkpoint, a PointLLM model, and this project's own names.
    PREFIXES = ("", "module.point_encoder.", "point_encoder.", "model.point_backbone.", "point_backbone.")

    def __init__(self, trans_dim: int = 384, depth: int = 12, num_heads: int = 6, group_size: int = 32,
                 num_group: int = 512, encoder_dims: int = 256, point_dims: int = 3, drop_cls: bool = False) -> None:
        super().__init__()
        if trans_dim % num_heads:
            raise ValueError(f"trans_dim {trans_dim} is not divisible by num_heads {num_heads}")
        if point_dims < 3:
            raise ValueError(f"point_dims must be at least 3 (xyz), got {point_dims}")
        self.options = dict(trans_dim=trans_dim, depth=depth, num_heads=num_heads, group_size=group_size,
                            num_group=num_group, encoder_dims=encoder_dims, point_dims=point_dims, drop_cls=drop_cls)
        self.output_dim = trans_dim
        self.group_size, self.num_group, self.point_dims, self.drop_cls = group_size, num_group, point_dims, drop_cls
        self.encoder = _GroupTokenizer(point_dims, encoder_dims)
        self.reduce_dim = nn.Linear(encoder_dims, trans_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, trans_dim))
        self.cls_pos = nn.Parameter(torch.randn(1, 1, trans_dim))
        self.pos_embed = nn.Sequential(nn.Linear(3, 128), nn.GELU(), nn.Linear(128, trans_dim))
        self.blocks = _Blocks(trans_dim, depth, num_heads)
        self.norm = nn.LayerNorm(trans_dim)

    @classmethod
    def from_state_dict_file(cls, path: str | Path, prefix: str = "auto", **options: Any) -> PointBERTEncoder:
        """Build with `options` and load a local state dict strictly: a `.safetensors` file, or a pickle read
        with `torch.load(weights_only=True)` (a top-level `state_dict` entry is unwrapped). Only keys under
        `prefix` are used ("auto": the first of `PREFIXES` under which `cls_token` exists); missing, unexpected
        or misshapen keys raise `CheckpointError`."""
        tensors = _read_state_dict(Path(path))
        if prefix == "auto":
            prefix = next((p for p in cls.PREFIXES if f"{p}cls_token" in tensors), None)
            if prefix is None:
                raise CheckpointError(f"{path}: no Point-BERT weights found (no cls_token under any of the "
                                      f"prefixes {', '.join(repr(p) for p in cls.PREFIXES)})")
        weights = {key[len(prefix):]: value for key, value in tensors.items() if key.startswith(prefix)}
        encoder = cls(**options)
        encoder.load_strict(weights, str(path))
        return encoder

    def load_strict(self, weights: dict[str, torch.Tensor], source: str = "state dict") -> None:
        """`load_state_dict` with every mismatch reported as one `CheckpointError` line naming `source`."""
        expected = self.state_dict()
        missing = [key for key in expected if key not in weights
                   and not key.endswith("num_batches_tracked")]  # old BatchNorm checkpoints lack this counter
        unexpected = [key for key in weights if key not in expected]
        problems = [f"missing {_preview(missing)}"] if missing else []
        problems += [f"unexpected {_preview(unexpected)}"] if unexpected else []
        problems += [f"shape of {key}: {tuple(weights[key].shape)} in the file, {tuple(value.shape)} expected "
                     f"(check the options {self.options})" for key, value in expected.items()
                     if key in weights and weights[key].shape != value.shape][:1]
        if problems:
            raise CheckpointError(f"{source}: not a Point-BERT state dict for these options: {'; '.join(problems)}")
        self.load_state_dict(weights, strict=False)

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        if points.shape[-1] != self.point_dims or points.shape[1] < max(self.num_group, self.group_size):
            raise ValueError(f"expected (n, N >= {max(self.num_group, self.group_size)}, {self.point_dims}) points, "
                             f"got shape {tuple(points.shape)}")
        dtype = self.reduce_dim.weight.dtype
        groups, centres = self._group(points.float())
        tokens = self.reduce_dim(self.encoder(groups.to(dtype)))
        batch = tokens.shape[0]
        tokens = torch.cat([self.cls_token.expand(batch, -1, -1), tokens], dim=1)
        position = torch.cat([self.cls_pos.expand(batch, -1, -1), self.pos_embed(centres.to(dtype))], dim=1)
        tokens = self.norm(self.blocks(tokens, position))
        return tokens[:, 1:] if self.drop_cls else tokens

    def _group(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`(n, N, C)` -> groups `(n, G, k, C)` (xyz relative to their centre) and centres `(n, G, 3)`."""
        xyz = points[..., :3]
        centre_index = farthest_point_sample(xyz, self.num_group)
        centres = torch.gather(xyz, 1, centre_index.unsqueeze(-1).expand(-1, -1, 3))
        neighbours = torch.cdist(centres, xyz).topk(self.group_size, dim=-1, largest=False).indices
        rows = torch.arange(points.shape[0], device=points.device).view(-1, 1, 1)
        groups = points[rows, neighbours]
        groups = torch.cat([groups[..., :3] - centres.unsqueeze(2), groups[..., 3:]], dim=-1)
        return groups, centres


def _preview(keys: Sequence[str], limit: int = 3) -> str:
    shown = ", ".join(keys[:limit])
    return f"{shown} (+{len(keys) - limit} more)" if len(keys) > limit else shown


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a local safetensors file or a pickled state dict, never executing pickled code."""
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(path)
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise CheckpointError(f"{path}: cannot read weights ({_first_line(error)})") from None
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise CheckpointError(f"{path}: not a state dict (a mapping of names to tensors)")
    return loaded


# --- CLIP image processor -----------------------------------------------------------------------------------


class CLIPPixelProcessor:
    """Any image input -> float32 `(3, crop_size, crop_size)` CLIP pixel values, for ONE sample.

    Decoding is `mmcompose.io.load_image`; resizing (shortest edge to `size`, bicubic), centre crop, rescaling
    and normalisation are transformers' CLIP image processor built from these parameters (no download).
    The defaults are OpenAI CLIP's; LLaVA-1.5 and ModelCompose use `size=336`. `pad_to_square` first pads the
    image to a square with the mean colour, as LLaVA-1.5 does (`image_aspect_ratio: pad`), so the crop keeps
    the whole image.
    """

    def __init__(self, size: int = 224, crop_size: int | None = None,
                 image_mean: Sequence[float] = OPENAI_CLIP_MEAN, image_std: Sequence[float] = OPENAI_CLIP_STD,
                 pad_to_square: bool = False) -> None:
        crop = size if crop_size is None else crop_size
        self.mean, self.pad_to_square = tuple(image_mean), pad_to_square
        self.processor = _CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": crop, "width": crop},
                                             image_mean=list(image_mean), image_std=list(image_std))

    def __call__(self, source: Any) -> torch.Tensor:
        image = load_image(source)
        if self.pad_to_square:
            image = _pad_to_square(image, tuple(round(255 * m) for m in self.mean))
        pixels = self.processor(image, return_tensors="pt", input_data_format="channels_last").pixel_values
        return pixels[0].float()


def _pad_to_square(image: np.ndarray, colour: tuple[int, ...]) -> np.ndarray:
    height, width = image.shape[:2]
    if height == width:
        return image
    side = max(height, width)
    canvas = Image.new("RGB", (side, side), colour)
    canvas.paste(Image.fromarray(image), ((side - width) // 2, (side - height) // 2))
    return np.asarray(canvas)
