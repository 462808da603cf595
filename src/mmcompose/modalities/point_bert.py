"""Point-BERT, the point encoder of PointLLM and ModelCompose, behind the plug-in interface (`point-bert`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmcompose.errors import CheckpointError
from mmcompose.modalities._local import load_strict
from mmcompose.modalities.encoders import farthest_point_sample
from mmcompose.tensorfiles import load_state_dict


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
        tensors = load_state_dict(Path(path), unwrap="state_dict")
        if prefix == "auto":
            prefix = next((p for p in cls.PREFIXES if f"{p}cls_token" in tensors), None)
            if prefix is None:
                raise CheckpointError(f"{path}: no Point-BERT weights found (no cls_token under any of the "
                                      f"prefixes {', '.join(repr(p) for p in cls.PREFIXES)})")
        weights = {key[len(prefix):]: value for key, value in tensors.items() if key.startswith(prefix)}
        encoder = cls(**options)
        load_strict(encoder, weights, str(path), "Point-BERT")
        return encoder

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
