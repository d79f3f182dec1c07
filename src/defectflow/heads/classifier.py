"""Pixelwise classification network: a decoder over the extractor's levels, U-Net style.

It starts at the deepest level and, level by level, upsamples, concatenates the next shallower
level (the skip connection) and mixes them with two 3x3 convolutions; a last upsampling brings
it to input resolution. It outputs one logit per pixel (sigmoid: probability of a defect).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import sigmoid_focal_loss

LOSSES = ("bce", "focal", "dice")


def _block(channels_in: int, channels_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(channels_in, channels_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(channels_out),
        nn.ReLU(inplace=True),
        nn.Conv2d(channels_out, channels_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(channels_out),
        nn.ReLU(inplace=True),
    )


class SegmentationDecoder(nn.Module):
    def __init__(self, channels: Sequence[int], width: int = 64) -> None:
        """channels: of each input level, shallow to deep. Decoder widths halve towards the input
        (never below 16)."""
        super().__init__()
        widths = [max(16, width >> (len(channels) - 1 - i)) for i in range(len(channels))]
        self.bottom = nn.Conv2d(channels[-1], widths[-1], 1)
        self.lateral = nn.ModuleList(nn.Conv2d(c, w, 1) for c, w in zip(channels[:-1], widths[:-1]))
        self.mix = nn.ModuleList(_block(widths[i] + widths[i + 1], widths[i]) for i in range(len(channels) - 1))
        self.head = nn.Sequential(nn.Conv2d(widths[0], 16, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(16, 1, 1))

    def forward(self, features: Sequence[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        """B x 1 x height x width logits (size = (height, width))."""
        x = self.bottom(features[-1])
        for level in range(len(features) - 2, -1, -1):
            skip = self.lateral[level](features[level])
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = self.mix[level](torch.cat([skip, x], dim=1))
        x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)
        return self.head(x)


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, kind: str = "bce") -> torch.Tensor:
    """Loss against soft targets in [0, 1]: binary cross-entropy (the paper's), focal, or dice."""
    if kind == "bce":
        return F.binary_cross_entropy_with_logits(logits, target)
    if kind == "focal":
        return sigmoid_focal_loss(logits, target, alpha=-1, gamma=2.0, reduction="mean")
    if kind == "dice":
        probability = torch.sigmoid(logits).flatten(1)
        target = target.flatten(1)
        overlap = (probability * target).sum(1)
        return (1 - (2 * overlap + 1) / (probability.sum(1) + target.sum(1) + 1)).mean()
    raise ValueError(f"Unknown loss {kind!r}: choose one of {LOSSES}")
