"""Reading images and masks from disk into tensors of a fixed size.

Every image becomes float RGB in [0, 1] whatever its mode (L, P, RGBA, CMYK, 16-bit, float);
normalisation for a backbone happens in the extractor, so synthetic-defect code can work in
plain [0, 1] pixel space.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from ..errors import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")

_SIXTEEN_BIT_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I"}


def _open(path: Path, decode: bool = True) -> Image.Image:
    try:
        image = Image.open(path)
        if decode:
            image.load()
    except FileNotFoundError:
        raise DataError(f"Image not found: {path}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(
            f"Cannot read image {path}: {exc}. Replace or remove the file (is it truncated or not an image?)."
        ) from None
    return image


def _to_float_rgb(image: Image.Image) -> np.ndarray:
    """HxWx3 float32 in [0, 1] for any PIL mode."""
    if image.mode in _SIXTEEN_BIT_MODES:
        array = np.asarray(image, dtype=np.float32)
        scale = 65535.0 if array.max(initial=0) > 255 or image.mode != "I" else 255.0
        array = np.clip(array / scale, 0.0, 1.0)
        return np.repeat(array[..., None], 3, axis=2)
    if image.mode == "F":
        array = np.clip(np.asarray(image, dtype=np.float32), 0.0, 1.0)
        return np.repeat(array[..., None], 3, axis=2)
    return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) from the file's header, without decoding the pixels."""
    return _open(Path(path), decode=False).size


def read_image(path: str | Path) -> torch.Tensor:
    """3 x H x W float tensor in [0, 1] at the file's own resolution."""
    array = _to_float_rgb(_open(Path(path)))
    return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)


Size = tuple[int, int]  # (height, width) in pixels
MASK_RESAMPLING = ("cover", "nearest")


def as_size(size: int | Sequence[int]) -> Size:
    """(height, width) from a side length or a (height, width) pair."""
    if isinstance(size, int):
        return (size, size)
    height, width = (int(v) for v in size)
    return (height, width)


def load_image(path: str | Path, size: int | Sequence[int]) -> torch.Tensor:
    """3 x H x W float tensor in [0, 1] at size (height, width; antialiased bilinear resize)."""
    return resize_image(read_image(path), size)


def resize_image(tensor: torch.Tensor, size: int | Sequence[int]) -> torch.Tensor:
    size = as_size(size)
    if tuple(tensor.shape[-2:]) == size:
        return tensor.contiguous()
    resized = F.interpolate(tensor[None], size=size, mode="bilinear", antialias=True, align_corners=False)
    return resized[0].clamp_(0.0, 1.0)


def resize_mask(binary: torch.Tensor, size: int | Sequence[int], resampling: str = "cover") -> torch.Tensor:
    """H x W 0/1 mask -> 1 x height x width 0/1 mask.

    "cover" marks every output pixel whose footprint touches a defect pixel (adaptive max
    pooling): no defect region vanishes, and a connected region stays connected, because
    neighbouring input pixels fall into the same or neighbouring output pixels. A hairline crack
    one pixel wide survives any downscaling; thin defects come out slightly wider.
    "nearest" is the papers' protocol (nearest-neighbour resize): thin defects can break up or vanish.
    """
    size = as_size(size)
    if resampling == "cover":
        return F.adaptive_max_pool2d(binary[None, None].float(), size)[0]
    if resampling == "nearest":
        return F.interpolate(binary[None, None].float(), size=size, mode="nearest")[0]
    raise ValueError(f"Unknown mask resampling {resampling!r}: choose one of {MASK_RESAMPLING}")


def load_mask(
    path: str | Path, size: int | Sequence[int], expected_size: tuple[int, int] | None = None, resampling: str = "cover"
) -> torch.Tensor:
    """1 x height x width float tensor of 0/1 (see resize_mask for the resampling).

    expected_size is the (width, height) of the image the mask belongs to; a mismatch is an error
    because a mask of another size usually belongs to another image or another resolution.
    """
    path = Path(path)
    image = _open(path)
    if expected_size is not None and image.size != tuple(expected_size):
        raise DataError(
            f"Mask {path} is {image.size[0]}x{image.size[1]} but its image is "
            f"{expected_size[0]}x{expected_size[1]}. Masks must have the size of their image."
        )
    array = np.asarray(image.convert("L") if image.mode not in _SIXTEEN_BIT_MODES | {"F"} else image)
    return resize_mask(torch.from_numpy(array > 0), size, resampling)
