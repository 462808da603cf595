"""CLIP behind the plug-in interface: the vision encoder (`clip-vision`) and its pixel processor (`clip-image`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from mmcompose.io import load_image
from mmcompose.modalities.processors import pad_to_square

try:  # transformers >= 5 names the PIL backend; plain CLIPImageProcessor would warn and fall back to it anyway
    from transformers import CLIPImageProcessorPil as _CLIPImageProcessor
except ImportError:  # transformers 4.x, where CLIPImageProcessor is the PIL/numpy implementation
    from transformers import CLIPImageProcessor as _CLIPImageProcessor


class CLIPVisionEncoder(nn.Module):
    """transformers' `CLIPVisionModel`, features taken as LLaVA does: hidden state `feature_layer`
    (penultimate by default), CLS dropped. Accepts `(B, 3, H, W)` images or `(B, T, 3, H, W)` videos,
    whose per-frame tokens are concatenated (`frame_pooling="concat"`) or averaged over time (`"mean"`).
    """

    def __init__(self, config: dict[str, Any], feature_layer: int = -2, drop_cls: bool = True,
                 frame_pooling: Literal["concat", "mean"] = "concat") -> None:
        super().__init__()
        self.options = dict(config=config, feature_layer=feature_layer, drop_cls=drop_cls,
                            frame_pooling=frame_pooling)
        self.model = CLIPVisionModel(CLIPVisionConfig(**config))
        self.output_dim = self.model.config.hidden_size
        self.feature_layer, self.drop_cls, self.frame_pooling = feature_layer, drop_cls, frame_pooling

    @classmethod
    def from_pretrained(cls, path: str, **options: Any) -> CLIPVisionEncoder:
        """Build from a local CLIP (or CLIP vision) directory; the weights are then ours to save."""
        pretrained = CLIPVisionModel.from_pretrained(path, local_files_only=True)
        encoder = cls(pretrained.config.to_dict(), **options)
        encoder.model.load_state_dict(pretrained.state_dict())
        return encoder

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        video = pixels.dim() == 5
        frames = pixels.flatten(0, 1) if video else pixels
        hidden = self.model(frames.to(self.model.dtype), output_hidden_states=True).hidden_states
        tokens = hidden[self.feature_layer]
        if self.drop_cls:
            tokens = tokens[:, 1:]
        if not video:
            return tokens
        tokens = tokens.unflatten(0, pixels.shape[:2])
        return tokens.mean(1) if self.frame_pooling == "mean" else tokens.flatten(1, 2)


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
            image = pad_to_square(image, self.mean)
        pixels = self.processor(image, return_tensors="pt", input_data_format="channels_last").pixel_values
        return pixels[0].float()

