"""From head outputs to anomaly maps and image scores.

Normalisation constants come from training (or validation) data only, so the score of a test
image never depends on the other test images. (CFlow-AD's reference code subtracts the test
set's maximum log-likelihood, which leaks test data.)
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torchvision.transforms.functional import gaussian_blur

IMAGE_REDUCTIONS = ("max", "mean")


def upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """B x h x w -> B x height x width, bilinear."""
    return F.interpolate(maps[:, None], size=tuple(size), mode="bilinear", align_corners=False)[:, 0]


def flow_anomaly_map(log_likelihoods: Sequence[torch.Tensor], references: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """CFlow-AD's map: levels' likelihoods, relative to a reference per level, summed at input size.

    exp(ll - ref) is a likelihood in (0, ~1]; summing them over levels and subtracting from the
    number of levels gives an anomaly score that is ~0 where every level finds the feature likely.
    """
    likelihood = sum(upsample(torch.exp(ll - ref), size) for ll, ref in zip(log_likelihoods, references))
    return len(log_likelihoods) - likelihood


def smooth(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian smoothing of B x H x W maps (sigma in pixels; 0 leaves them as they are)."""
    if sigma <= 0:
        return maps
    kernel = 2 * int(4.0 * sigma + 0.5) + 1
    return gaussian_blur(maps[:, None], kernel_size=[kernel, kernel], sigma=[sigma, sigma])[:, 0]


def image_scores(maps: torch.Tensor, reduction: str = "max") -> torch.Tensor:
    """One score per map."""
    flat = maps.flatten(1)
    if reduction == "max":
        return flat.max(dim=1).values
    if reduction == "mean":
        return flat.mean(dim=1)
    raise ValueError(f"Unknown image score reduction {reduction!r}: choose one of {IMAGE_REDUCTIONS}")


def normalise(maps: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Affine rescaling so that low -> 0 and high -> 1 (low/high measured on normal data)."""
    return (maps - low) / (high - low).clamp_min(1e-12)
