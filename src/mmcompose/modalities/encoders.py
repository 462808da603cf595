"""Encoders: a module from a processed batch to tokens `(batch, tokens, output_dim)`.

The native encoders here are small and randomly initialised so the synthetic world trains them on a CPU;
the pretrained families live in `clip`, `whisper`, `clap` and `point_bert`. Each encoder keeps `options`,
the keyword arguments that rebuild it, so a checkpoint manifest can record it.
"""

from __future__ import annotations

import torch
from torch import nn


def _transformer(width: int, depth: int, heads: int) -> nn.Module:
    if depth == 0:
        return nn.Identity()
    layer = nn.TransformerEncoderLayer(width, heads, dim_feedforward=4 * width, dropout=0.0,
                                       batch_first=True, norm_first=True)
    return nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)


class ImagePatchEncoder(nn.Module):
    """`(B, 3, H, W)` float images -> `(B, (H/patch)*(W/patch), width)` patch tokens."""

    def __init__(self, image_size: int = 32, patch_size: int = 8, width: int = 128, depth: int = 2,
                 heads: int = 4) -> None:
        super().__init__()
        self.options = dict(image_size=image_size, patch_size=patch_size, width=width, depth=depth, heads=heads)
        self.output_dim = width
        self.patchify = nn.Conv2d(3, width, patch_size, stride=patch_size)
        self.position = nn.Parameter(torch.randn((image_size // patch_size) ** 2, width) * 0.02)
        self.blocks = _transformer(width, depth, heads)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.patchify(images).flatten(2).transpose(1, 2)
        return self.blocks(tokens + self.position)


class AudioFrameEncoder(nn.Module):
    """`(B, samples)` mono waveform -> `(B, frames, width)`: log-magnitude STFT frames, projected, then blocks."""

    def __init__(self, num_samples: int = 16000, n_fft: int = 400, hop: int = 640, width: int = 128,
                 depth: int = 2, heads: int = 4) -> None:
        super().__init__()
        self.options = dict(num_samples=num_samples, n_fft=n_fft, hop=hop, width=width, depth=depth, heads=heads)
        self.output_dim = width
        self.n_fft, self.hop = n_fft, hop
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)
        num_frames = num_samples // hop + 1
        self.project = nn.Linear(n_fft // 2 + 1, width)
        self.position = nn.Parameter(torch.randn(num_frames, width) * 0.02)
        self.blocks = _transformer(width, depth, heads)

    def forward(self, waves: torch.Tensor) -> torch.Tensor:
        spectrum = torch.stft(waves.float(), self.n_fft, self.hop, window=self.window, return_complex=True)
        frames = torch.log1p(spectrum.abs()).transpose(1, 2).to(self.project.weight.dtype)
        return self.blocks(self.project(frames) + self.position[: frames.shape[1]])


class VideoFrameEncoder(nn.Module):
    """`(B, T, 3, H, W)` frames -> `(B, T * tokens_per_frame, width)`: pooled patch tokens plus time embedding."""

    def __init__(self, num_frames: int = 8, patch_size: int = 4, tokens_per_frame: int = 4, width: int = 128,
                 depth: int = 2, heads: int = 4) -> None:
        super().__init__()
        self.options = dict(num_frames=num_frames, patch_size=patch_size, tokens_per_frame=tokens_per_frame,
                            width=width, depth=depth, heads=heads)
        self.output_dim = width
        side = int(tokens_per_frame**0.5)
        if side * side != tokens_per_frame:
            raise ValueError("tokens_per_frame must be a square number")
        self.patchify = nn.Conv2d(3, width, patch_size, stride=patch_size)
        self.pool = nn.AdaptiveAvgPool2d(side)
        self.time = nn.Parameter(torch.randn(num_frames, 1, width) * 0.02)
        self.space = nn.Parameter(torch.randn(1, tokens_per_frame, width) * 0.02)
        self.blocks = _transformer(width, depth, heads)

    def forward(self, videos: torch.Tensor) -> torch.Tensor:
        batch, frames = videos.shape[:2]
        tokens = self.pool(self.patchify(videos.flatten(0, 1))).flatten(2).transpose(1, 2)
        tokens = tokens.unflatten(0, (batch, frames)) + self.time[:frames] + self.space
        return self.blocks(tokens.flatten(1, 2))


def farthest_point_sample(points: torch.Tensor, count: int) -> torch.Tensor:
    """Indices `(B, count)` of a farthest-point subset. It starts from the point farthest from the centroid,
    not from whichever point a file lists first, so the same shape gives its groups in the same order
    whatever the order of its points: the LLM reads the groups as a sequence."""
    batch, num_points, _ = points.shape
    chosen = torch.zeros(batch, count, dtype=torch.long, device=points.device)
    distance = torch.full((batch, num_points), float("inf"), device=points.device)
    current = (points - points.mean(1, keepdim=True)).pow(2).sum(-1).argmax(-1)
    rows = torch.arange(batch, device=points.device)
    for step in range(count):
        chosen[:, step] = current
        centre = points[rows, current].unsqueeze(1)
        distance = torch.minimum(distance, (points - centre).pow(2).sum(-1))
        current = distance.argmax(-1)
    return chosen


class PointGroupEncoder(nn.Module):
    """`(B, N, 3)` points -> `(B, groups, width)`: Point-BERT-style grouping (FPS centres, k nearest
    neighbours), a shared mini-PointNet per group, a centre position embedding, then blocks."""

    def __init__(self, num_groups: int = 32, group_size: int = 16, width: int = 128, depth: int = 2,
                 heads: int = 4) -> None:
        super().__init__()
        self.options = dict(num_groups=num_groups, group_size=group_size, width=width, depth=depth, heads=heads)
        self.output_dim = width
        self.num_groups, self.group_size = num_groups, group_size
        self.point_mlp = nn.Sequential(nn.Linear(3, width), nn.GELU(), nn.Linear(width, width))
        self.position = nn.Sequential(nn.Linear(3, width), nn.GELU(), nn.Linear(width, width))
        self.blocks = _transformer(width, depth, heads)

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        xyz = points[..., :3].float()
        centre_index = farthest_point_sample(xyz, self.num_groups)
        centres = torch.gather(xyz, 1, centre_index.unsqueeze(-1).expand(-1, -1, 3))
        neighbours = torch.cdist(centres, xyz).topk(self.group_size, dim=-1, largest=False).indices
        grouped = torch.gather(xyz.unsqueeze(1).expand(-1, self.num_groups, -1, -1), 2,
                               neighbours.unsqueeze(-1).expand(-1, -1, -1, 3))
        dtype = self.point_mlp[0].weight.dtype
        # Offsets within a group are a few hundredths of the unit sphere: at that scale the pooled local features
        # barely differ between shapes and learn slowly. Dividing by the cloud's mean offset length brings them to
        # unit scale and keeps every group's size relative to the others.
        local = grouped - centres.unsqueeze(2)
        scale = local.norm(dim=-1).mean(dim=(1, 2)).clamp_min(1e-6).view(-1, 1, 1, 1)
        local = (local / scale).to(dtype)
        tokens = self.point_mlp(local).amax(dim=2) + self.position(centres.to(dtype))
        return self.blocks(tokens)
