"""The frame-validity guard: is this frame a normal part of this product at all?

The anomaly map cannot say so by itself. A normalizing flow can give a blank or very plain frame
a higher likelihood than real parts (MVTec bottle: black, white and grey frames scored below
every good part), so a dead camera or an empty station would come out OK. The guard checks
each frame against what the training images showed, on both sides:

- brightness, contrast and fine detail of the grey image (mean, standard deviation, mean
  absolute difference of neighbouring pixels): blank, saturated, noise, a wrong exposure;
- colour (the mean spread of a pixel's three channels): a colour camera that lost its colour,
  a frame in colour where the product is imaged in grey;
- the Mahalanobis distance of the deepest features, averaged over the frame, to those of the
  training images (Ledoit-Wolf covariance): another product, another scene.

Allowed ranges come from good training images only: each statistic's range on them, widened
on both sides by that range and at least by a quarter of its median (good parts drift more than
a few hundred training images show; colour by at least COLOUR_FLOOR, so a grey product's JPEG
chroma noise or a white-balance drift of a few levels is no fault), and the feature distance up
to three times the largest seen on good images (held-out ones included: images the covariance
was fitted on sit closer to it).
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.covariance import LedoitWolf
from torch import nn

CHECKS = ("brightness", "contrast", "fine detail", "colour", "features")
RANGE_WIDENING = 1.0  # of the range seen on training images, on each side
MIN_WIDENING = 0.25  # of the median, on each side
COLOUR_FLOOR = 0.02  # the least widening of the colour range: about 5 of 255 levels of channel spread
DISTANCE_FACTOR = 3.0


def input_statistics(images: torch.Tensor) -> torch.Tensor:
    """B x 4: brightness, contrast, fine detail and colour of B x 3 x H x W images in [0, 1]."""
    grey = images.mean(dim=1)
    detail = ((grey[:, :, 1:] - grey[:, :, :-1]).abs().mean(dim=(1, 2)) + (grey[:, 1:] - grey[:, :-1]).abs().mean(dim=(1, 2))) / 2
    colour = (images.amax(dim=1) - images.amin(dim=1)).mean(dim=(1, 2))
    return torch.stack([grey.mean(dim=(1, 2)), grey.std(dim=(1, 2)), detail, colour], dim=1)


class FrameGuard(nn.Module):
    """(images, deepest features) -> B x 4 deviations, one per check in CHECKS, in units of what
    is allowed: above 1 means the frame is outside what good training images showed."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.register_buffer("calibrated", torch.tensor(0.0))  # 0: a checkpoint from before the guard
        self.register_buffer("centre", torch.zeros(3))
        self.register_buffer("low", torch.full((3,), -1.0))
        self.register_buffer("high", torch.ones(3))
        # the colour check's centre, low, high; added later: a guard from before loads these defaults,
        # which no colour in [0, 1] is outside
        self.register_buffer("colour_range", torch.tensor([0.0, -1.0, 1.0]))
        self.register_buffer("feature_mean", torch.zeros(channels))
        self.register_buffer("precision", torch.eye(channels))
        self.register_buffer("distance_limit", torch.tensor(1.0))

    def feature_distance(self, features: torch.Tensor) -> torch.Tensor:
        """Mahalanobis distance of each frame's spatially averaged B x C x h x w features."""
        centred = features.mean(dim=(2, 3)) - self.feature_mean
        return (centred @ self.precision * centred).sum(dim=1).clamp_min(0).sqrt()

    def forward(self, images: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        stats = input_statistics(images)
        centre = torch.cat([self.centre, self.colour_range[:1]])
        low = torch.cat([self.low, self.colour_range[1:2]])
        high = torch.cat([self.high, self.colour_range[2:]])
        above = (stats - centre) / (high - centre).clamp_min(1e-12)
        below = (centre - stats) / (centre - low).clamp_min(1e-12)
        deviations = torch.cat([torch.maximum(above, below), (self.feature_distance(features) / self.distance_limit)[:, None]], dim=1)
        return deviations * self.calibrated

    @torch.no_grad()
    def calibrate(self, stats: torch.Tensor, pooled: torch.Tensor, held_stats: torch.Tensor, held_pooled: torch.Tensor) -> None:
        """From good images: N x 4 input statistics and N x C averaged features of training images
        (the covariance is fitted on these), and the same of held-out good images (may be empty)."""
        every = torch.cat([stats, held_stats]).double()
        low, high, centre = every.min(dim=0).values, every.max(dim=0).values, every.median(dim=0).values
        margin = torch.maximum(RANGE_WIDENING * (high - low), MIN_WIDENING * centre.abs())
        margin[3] = margin[3].clamp_min(COLOUR_FLOOR)
        low, high = low - margin, high + margin
        self.centre.copy_(centre[:3])
        self.low.copy_(low[:3])
        self.high.copy_(high[:3])
        self.colour_range.copy_(torch.stack([centre[3], low[3], high[3]]))
        covariance = LedoitWolf().fit(pooled.double().cpu().numpy())
        self.feature_mean.copy_(torch.from_numpy(covariance.location_))
        self.precision.copy_(torch.from_numpy(np.asarray(covariance.precision_)))
        self.calibrated.fill_(1.0)
        every_pooled = torch.cat([pooled, held_pooled])[:, :, None, None].to(self.feature_mean)
        self.distance_limit.fill_(DISTANCE_FACTOR * float(self.feature_distance(every_pooled).max()))


def reasons(deviations: np.ndarray) -> list[str]:
    """Per frame: the checks it fails, e.g. "contrast, features", or "" when it passes."""
    return [", ".join(name for name, value in zip(CHECKS, row) if value > 1) for row in np.asarray(deviations)]
