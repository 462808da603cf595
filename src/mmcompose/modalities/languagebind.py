"""LanguageBind's video encoder (`LanguageBind_Video_merge`): a CLIP ViT whose every layer first attends over
time, the video encoder of the released ModelCompose video model; and its frame processor.

Written from the published architecture; parameter names are the Hugging Face checkpoint's under
`vision_model.` (CLIP's, plus `temporal_embedding`, `temporal_layer_norm1` and `temporal_attn.*` per layer), so
a `LanguageBind_Video_merge` directory (config.json + safetensors or pytorch_model.bin) loads without renaming.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmcompose.errors import CheckpointError, InputError
from mmcompose.files import read_json
from mmcompose.io import load_video
from mmcompose.modalities._local import load_strict
from mmcompose.tensorfiles import load_state_dict

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

#: The vision-config fields that shape the tower; the released model's values are the defaults.
VISION_DEFAULTS: dict[str, Any] = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                       num_attention_heads=16, num_channels=3, image_size=224, patch_size=14,
                                       layer_norm_eps=1e-5, hidden_act="gelu", add_time_attn=True, num_frames=8)


class _Attention(nn.Module):
    """CLIP attention (q, k, v, out projections with bias; scale head_dim^-0.5; no mask)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj = nn.Linear(width, width), nn.Linear(width, width)
        self.v_proj, self.out_proj = nn.Linear(width, width), nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        split = (batch, length, self.heads, width // self.heads)
        q, k, v = (proj(x).view(split).transpose(1, 2) for proj in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, length, width)
        return self.out_proj(out)


class _MLP(nn.Module):
    def __init__(self, width: int, intermediate: int, act: str) -> None:
        super().__init__()
        if act not in ("gelu", "quick_gelu"):
            raise ValueError(f"unsupported hidden_act {act!r} (expected 'gelu' or 'quick_gelu')")
        self.act = act
        self.fc1, self.fc2 = nn.Linear(width, intermediate), nn.Linear(intermediate, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.fc1(x)
        hidden = F.gelu(hidden) if self.act == "gelu" else hidden * torch.sigmoid(1.702 * hidden)
        return self.fc2(hidden)


class _Layer(nn.Module):
    """Temporal block (own time embedding added to the stream, pre-LN attention across the frames of each
    token position, no MLP), then CLIP's spatial pre-LN block over the tokens of each frame."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        width, eps = cfg["hidden_size"], cfg["layer_norm_eps"]
        self.time = cfg["add_time_attn"]
        if self.time:
            self.temporal_embedding = nn.Parameter(torch.zeros(1, cfg["num_frames"], width))
            self.temporal_layer_norm1 = nn.LayerNorm(width, eps=eps)
            self.temporal_attn = _Attention(width, cfg["num_attention_heads"])
        self.self_attn = _Attention(width, cfg["num_attention_heads"])
        self.layer_norm1 = nn.LayerNorm(width, eps=eps)
        self.mlp = _MLP(width, cfg["intermediate_size"], cfg["hidden_act"])
        self.layer_norm2 = nn.LayerNorm(width, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, frames, tokens, width = x.shape
        if self.time:
            x = x + self.temporal_embedding[:, :frames].unsqueeze(2)
            across = x.transpose(1, 2).reshape(batch * tokens, frames, width)
            attended = self.temporal_attn(self.temporal_layer_norm1(across))
            x = x + attended.view(batch, tokens, frames, width).transpose(1, 2)
        flat = x.reshape(batch * frames, tokens, width)
        flat = flat + self.self_attn(self.layer_norm1(flat))
        flat = flat + self.mlp(self.layer_norm2(flat))
        return flat.view(batch, frames, tokens, width)


class _Embeddings(nn.Module):
    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        width, patch = cfg["hidden_size"], cfg["patch_size"]
        self.class_embedding = nn.Parameter(torch.zeros(width))
        self.patch_embedding = nn.Conv2d(cfg["num_channels"], width, patch, stride=patch, bias=False)
        self.position_embedding = nn.Embedding((cfg["image_size"] // patch) ** 2 + 1, width)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixels).flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(patches.shape[0], 1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight


class _VisionModel(nn.Module):
    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        width = cfg["hidden_size"]
        self.embeddings = _Embeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(width, eps=cfg["layer_norm_eps"])  # sic: CLIP's checkpoint name
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(_Layer(cfg) for _ in range(cfg["num_hidden_layers"]))
        self.post_layernorm = nn.LayerNorm(width, eps=cfg["layer_norm_eps"])


class LanguageBindVideoEncoder(nn.Module):
    """`(n, T, 3, H, W)` CLIP-normalised frames -> `(n, T * (patches + 1), hidden_size)`.

    The official tower returns hidden state `feature_layer` (-2: the input of the last layer) of every frame,
    CLS included and without the post-LayerNorm; ModelCompose flattens (T, tokens) into one sequence, which is
    what this returns (8 x 257 = 2056 tokens for the released model). Layers past `feature_layer` are not run.
    T must equal `num_frames`: the temporal embedding and attention are defined for that many frames, and
    the official code silently mixes frames of different videos otherwise; any other count is refused.

    Where this differs from the official module: the official layer falls back to no temporal embedding when
    the whole batch holds fewer than `num_frames` frames; that case is refused here rather than reproduced.
    The tower is frozen in ModelCompose; patch dropout (0 in the release) is not implemented.
    """

    def __init__(self, config: dict[str, Any], feature_layer: int = -2) -> None:
        super().__init__()
        cfg = {**VISION_DEFAULTS, **{k: v for k, v in config.items() if k in VISION_DEFAULTS}}
        if cfg["hidden_size"] % cfg["num_attention_heads"]:
            raise ValueError(f"hidden_size {cfg['hidden_size']} is not divisible by {cfg['num_attention_heads']} heads")
        layers = cfg["num_hidden_layers"]
        if not -layers - 1 <= feature_layer <= layers:
            raise ValueError(f"feature_layer {feature_layer} is outside the {layers + 1} hidden states")
        self.options = dict(config=cfg, feature_layer=feature_layer)
        self.output_dim = cfg["hidden_size"]
        self.num_frames = cfg["num_frames"]
        self.feature_layer = feature_layer % (layers + 1)
        self.vision_model = _VisionModel(cfg)

    @classmethod
    def from_pretrained(cls, path: str | Path, feature_layer: int = -2) -> LanguageBindVideoEncoder:
        """Load a local `LanguageBind_Video_merge` directory: `config.json` (a LanguageBind config with
        `vision_config`, a bare vision config, or this project's fixture layout) and `model.safetensors`,
        `weights.safetensors` or `pytorch_model.bin` (read with `weights_only=True`). Only `vision_model.*`
        weights are used; any of those missing, unexpected or misshapen is a one-line `CheckpointError`."""
        path = Path(path)
        config_file = path / "config.json"
        if not config_file.is_file():
            raise CheckpointError(f"{path}: no config.json (a LanguageBind video directory needs config and weights)")
        config = read_json(config_file)
        vision = config.get("vision_config", config)
        if not isinstance(vision, dict) or "hidden_size" not in vision:
            raise CheckpointError(f"{config_file}: no vision_config with hidden_size")
        try:
            encoder = cls(vision, feature_layer=feature_layer)
        except (ValueError, TypeError) as error:
            raise CheckpointError(f"{config_file}: bad vision_config ({error})") from None
        weights_file = next((path / name for name in ("model.safetensors", "weights.safetensors", "pytorch_model.bin")
                             if (path / name).is_file()), None)
        if weights_file is None:
            raise CheckpointError(f"{path}: no model.safetensors, weights.safetensors or pytorch_model.bin")
        weights = {k: v for k, v in load_state_dict(weights_file).items()
                   if k.startswith("vision_model.") and k != "vision_model.embeddings.position_ids"}
        load_strict(encoder, weights, str(weights_file), "LanguageBind")
        return encoder.eval()

    def hidden_states(self, pixels: torch.Tensor, up_to: int | None = None) -> list[torch.Tensor]:
        """[pre-LayerNorm embeddings, layer 1, ..., layer `up_to`], each `(n, T, tokens, width)`."""
        if pixels.dim() != 5 or pixels.shape[1] != self.num_frames:
            raise InputError(f"LanguageBind video encoder: expected (n, {self.num_frames}, 3, H, W) frames, got "
                             f"shape {tuple(pixels.shape)}; it needs exactly {self.num_frames} frames per video")
        model = self.vision_model
        batch, frames = pixels.shape[:2]
        x = model.embeddings(pixels.flatten(0, 1).to(model.pre_layrnorm.weight.dtype))
        x = model.pre_layrnorm(x).unflatten(0, (batch, frames))
        states = [x]
        for layer in model.encoder.layers[: up_to if up_to is not None else len(model.encoder.layers)]:
            x = layer(x)
            states.append(x)
        return states

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        tokens = self.hidden_states(pixels, up_to=self.feature_layer)[self.feature_layer]
        return tokens.flatten(1, 2)


class LanguageBindVideoProcessor:
    """Any video input -> float32 `(num_frames, 3, size, size)` for ONE clip, as LanguageBind prepares it.

    Frames: `num_frames` spread uniformly over the video by `mmcompose.io.load_video` (a video with fewer
    frames repeats frames in order, as the official `linspace` sampling does; the tower always gets exactly
    `num_frames`). Then, in the official order: scale to [0, 1], normalise with CLIP's mean/std, resize the
    short side to `size` (bilinear), centre-crop `size` x `size`.

    Where this differs from the official processor: frame indices are rounded to the nearest frame in time
    (official: `linspace(0, n - 1, T)` truncated), and the official random horizontal flip (applied even at
    inference) is left out, so the same video always gives the same tensor.
    """

    def __init__(self, num_frames: int = 8, size: int = 224, mean: Sequence[float] = OPENAI_CLIP_MEAN,
                 std: Sequence[float] = OPENAI_CLIP_STD) -> None:
        self.num_frames, self.size, self.mean, self.std = num_frames, size, tuple(mean), tuple(std)

    def __call__(self, source: Any) -> torch.Tensor:
        frames = torch.from_numpy(load_video(source, num_frames=self.num_frames)).permute(0, 3, 1, 2).float()
        frames = frames / 255.0
        frames = (frames - torch.tensor(self.mean).view(1, 3, 1, 1)) / torch.tensor(self.std).view(1, 3, 1, 1)
        height, width = frames.shape[-2:]
        if width < height:
            new = (math.floor(height / width * self.size), self.size)
        else:
            new = (self.size, math.floor(width / height * self.size))
        frames = F.interpolate(frames, size=new, mode="bilinear", align_corners=False)
        top, left = round((new[0] - self.size) / 2), round((new[1] - self.size) / 2)
        return frames[..., top:top + self.size, left:left + self.size].contiguous()


__all__ = ["LanguageBindVideoEncoder", "LanguageBindVideoProcessor"]
