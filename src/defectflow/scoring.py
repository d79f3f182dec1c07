"""From head outputs to anomaly maps and image scores.

Normalisation constants come from training (or validation) data only, so the score of a test
image never depends on the other test images. (CFlow-AD's reference code subtracts the test
set's maximum log-likelihood, which leaks test data.)
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

IMAGE_REDUCTIONS = ("top", "max", "mean")


def upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """B x h x w -> B x height x width, bilinear."""
    return F.interpolate(maps[:, None], size=tuple(size), mode="bilinear", align_corners=False)[:, 0]


def flow_anomaly_map(log_likelihoods: Sequence[torch.Tensor], references: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """CFlow-AD's map: levels' likelihoods, relative to a reference per level, summed at `size`.

    exp(ll - ref) is a likelihood in (0, ~1]; summing them over levels and subtracting from the
    number of levels gives an anomaly score that is ~0 where every level finds the feature likely.
    """
    likelihood = sum(upsample(torch.exp(ll - ref), size) for ll, ref in zip(log_likelihoods, references))
    return len(log_likelihoods) - likelihood


def smooth(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian smoothing of B x H x W maps (sigma in pixels; 0 leaves them as they are).

    Separable (a row pass, then a column pass) with reflected borders: the same result as a 2-D
    Gaussian kernel of radius 4 sigma, at 2 (2r+1) instead of (2r+1)^2 operations per pixel; the
    2-D kernel was a third of the exported model's time at 256 x 256.
    """
    if sigma <= 0:
        return maps
    radius = int(4.0 * sigma + 0.5)
    offsets = torch.arange(-radius, radius + 1, dtype=maps.dtype, device=maps.device)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    padded = F.pad(maps[:, None], (radius,) * 4, mode="reflect")
    rows = F.conv2d(padded, kernel.view(1, 1, 1, -1))
    return F.conv2d(rows, kernel.view(1, 1, -1, 1))[:, 0]


def footprint(sigma: float) -> int:
    """Pixels of the smallest region a map smoothed with `sigma` resolves: a disc of radius 2 sigma
    (1 pixel without smoothing)."""
    return max(1, round(math.pi * (2.0 * sigma) ** 2))


def image_scores(maps: torch.Tensor, reduction: str = "max", area: int = 1) -> torch.Tensor:
    """One score per map: its max, its mean, or (top) the mean of its `area` highest pixels.

    With `area` = footprint(sigma), `top` asks a defect to raise one region the map can resolve,
    not a single pixel: the max of a map is its noisiest statistic (one pixel's luck on a good
    part decides it), and a top-area mean also ranks a larger defect above a smaller one.
    """
    flat = maps.flatten(1)
    if reduction == "max":
        return flat.max(dim=1).values
    if reduction == "top":
        return flat.topk(min(area, flat.shape[1]), dim=1).values.mean(dim=1)
    if reduction == "mean":
        return flat.mean(dim=1)
    raise ValueError(f"Unknown image score reduction {reduction!r}: choose one of {IMAGE_REDUCTIONS}")


def normalise(maps: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Affine rescaling so that low -> 0 and high -> 1 (low/high measured on normal data)."""
    return (maps - low) / (high - low).clamp_min(1e-12)
