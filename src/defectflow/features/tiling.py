"""Feature extraction on overlapping tiles, stitched into the features of the whole image.

Large images (a 1600 x 1600 part, a 1260 x 500 commutator at native resolution) would need the
backbone's activations for the whole image at once. Here the backbone sees one tile at a time
and each output cell is taken from the tile in which it lies farthest from the tile's border
(overlaps are split in the middle), so the stitched features match the untiled ones except
where a cell's receptive field reaches past the overlap. The heads (flows, classifier) then run
on the stitched features exactly as on untiled ones: the flows' positional condition is the
cell's position in the whole image, which is what tells an aligned part's regions apart (a
position within a tile would say nothing about which part of the product a cell shows).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from ..errors import ConfigError

ALIGN = 32  # the coarsest stride of the supported backbones: tile borders fall on every level's grid


def tile_spans(length: int, tile: int, overlap: int) -> list[tuple[int, int, int]]:
    """(start, keep_from, keep_to) per tile along one axis, in pixels: the tile covers
    [start, start + tile) and supplies [keep_from, keep_to) of the stitched output."""
    if length <= tile:
        return [(0, 0, length)]
    starts = list(range(0, length - tile, tile - overlap)) + [length - tile]
    bounds = [0] + [ALIGN * round((b + a + tile) / 2 / ALIGN) for a, b in zip(starts, starts[1:])] + [length]
    return [(start, low, high) for start, low, high in zip(starts, bounds, bounds[1:])]


def stitched_features(
    extract: Callable[[torch.Tensor], Sequence[torch.Tensor]], images: torch.Tensor, tile: int, overlap: int
) -> list[torch.Tensor]:
    """extract() on overlapping tiles of B x 3 x H x W images, stitched per level."""
    height, width = images.shape[-2:]
    if height % ALIGN or width % ALIGN:
        raise ConfigError(f"Tiled extraction needs image sides that are multiples of {ALIGN}, got {height} x {width}.")
    rows, columns = tile_spans(height, tile, overlap), tile_spans(width, tile, overlap)
    out: list[torch.Tensor] = []
    for row_start, row_low, row_high in rows:
        for col_start, col_low, col_high in columns:
            crop = images[..., row_start:row_start + min(tile, height), col_start:col_start + min(tile, width)]
            features = extract(crop)
            if not out:
                out = [f.new_zeros(*f.shape[:2], *_stitched_size(f, crop, height, width)) for f in features]
            for target, feature in zip(out, features):
                stride = crop.shape[-1] // feature.shape[-1]
                target[..., row_low // stride:row_high // stride, col_low // stride:col_high // stride] = feature[
                    ..., (row_low - row_start) // stride:(row_high - row_start) // stride,
                    (col_low - col_start) // stride:(col_high - col_start) // stride,
                ]
    return out


def _stitched_size(feature: torch.Tensor, crop: torch.Tensor, height: int, width: int) -> tuple[int, int]:
    """The level's grid for the whole image; tiles must map onto it exactly."""
    stride_y, stride_x = crop.shape[-2] // feature.shape[-2], crop.shape[-1] // feature.shape[-1]
    if stride_y * feature.shape[-2] != crop.shape[-2] or stride_x * feature.shape[-1] != crop.shape[-1] or stride_y != stride_x:
        raise ConfigError(
            f"This backbone's {feature.shape[-2]} x {feature.shape[-1]} features of a {crop.shape[-2]} x {crop.shape[-1]} tile "
            "do not divide it evenly, so its tiles cannot be stitched: use a timm or ResNet backbone, or no tile_size."
        )
    return height // stride_y, width // stride_x
