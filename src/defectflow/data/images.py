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
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")

_SIXTEEN_BIT_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I"}
MIN_SIDE = 32  # the smallest image side training accepts


def _open(path: Path, decode: bool = True, what: str = "image") -> Image.Image:
    """The image as it should be seen: decoded, and turned upright as its EXIF orientation says.
    `what` names the file in errors (an image, a mask)."""
    try:
        image = Image.open(path)
        if decode:
            image.load()
            image = ImageOps.exif_transpose(image)
    except FileNotFoundError:
        raise DataError(f"{what.capitalize()} not found: {path}") from None
    except Image.DecompressionBombError:
        raise DataError(
            f"{what.capitalize()} {path} has more pixels than PIL reads safely ({2 * Image.MAX_IMAGE_PIXELS:,}): a decompression bomb "
            "or a huge scan. Reduce it, or remove the file."
        ) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(
            f"Cannot read {what} {path}: {exc}. Replace or remove the file (is it truncated or not an image?)."
        ) from None
    return image


def _orientation(image: Image.Image) -> int:
    """The EXIF orientation tag (1 = upright) without decoding pixels; PNG keeps EXIF after its
    pixel data at times, which is then read only when the image is decoded (and taken as upright here)."""
    if image.format == "PNG" and "exif" not in image.info:
        return 1
    try:
        return int(image.getexif().get(0x0112, 1))
    except Exception:  # noqa: BLE001 - a damaged EXIF block does not stop the image from being read
        return 1


def _to_float_rgb(image: Image.Image) -> np.ndarray:
    """HxWx3 float32 in [0, 1] for any PIL mode."""
    if image.mode in _SIXTEEN_BIT_MODES:
        # one scale for every frame, whatever its content: a dark 16-bit frame (a failed exposure)
        # must stay dark, not be stretched as if it were an 8-bit one
        array = np.clip(np.asarray(image, dtype=np.float32) / 65535.0, 0.0, 1.0)
        return np.repeat(array[..., None], 3, axis=2)
    if image.mode == "F":
        array = np.clip(np.asarray(image, dtype=np.float32), 0.0, 1.0)
        return np.repeat(array[..., None], 3, axis=2)
    return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) of the upright image, from the file's header, without decoding the pixels."""
    image = _open(Path(path), decode=False)
    width, height = image.size
    return (height, width) if _orientation(image) in (5, 6, 7, 8) else (width, height)


def check_min_size(path: str | Path, size: tuple[int, int], least: int = MIN_SIDE) -> None:
    """Refuse an image too small for the extractor's coarsest level to see anything."""
    if min(size) < least:
        raise DataError(
            f"Image {path} is {size[0]}x{size[1]} px: training images must be at least {least} px on each side. "
            "Remove it, or use the full-resolution image."
        )


def to_tensor(image: "np.ndarray | Image.Image | torch.Tensor", name: str) -> torch.Tensor:
    """3 x H x W float in [0, 1] from an image in memory: a PIL image, or an HxW / HxWx3 (or HxWx4)
    array or 3xHxW tensor, uint8 or float in [0, 1]. name (e.g. "<array 0>") is for messages."""
    if isinstance(image, Image.Image):
        return torch.from_numpy(np.ascontiguousarray(_to_float_rgb(image))).permute(2, 0, 1)
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] not in (1, 3):
            raise DataError(f"{name}: a tensor image must be C x H x W with 1 or 3 channels, got shape {tuple(image.shape)}")
        image = image.detach().cpu().permute(1, 2, 0).numpy()
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[2] in (1, 3, 4):
        array = array[..., :3] if array.shape[2] != 1 else array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] != 3):
        raise DataError(f"{name}: an image array must be H x W or H x W x 3, got shape {array.shape}")
    if array.dtype == np.uint8:
        array = array.astype(np.float32) / 255.0
    elif np.issubdtype(array.dtype, np.floating) or array.dtype == np.bool_:
        array = array.astype(np.float32)
        if not np.isfinite(array).all() or array.min(initial=0) < 0 or array.max(initial=0) > 1:
            raise DataError(f"{name}: a float image must hold values in [0, 1] (uint8 for 0-255), got {array.min()}..{array.max()}")
    else:
        raise DataError(f"{name}: image arrays must be uint8 or float in [0, 1], got {array.dtype}")
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)


def read_image(path: str | Path) -> torch.Tensor:
    """3 x H x W float tensor in [0, 1] at the file's own resolution."""
    image = _open(Path(path))
    try:
        array = _to_float_rgb(image)
    except (ValueError, OSError, TypeError) as exc:  # a mode or palette PIL cannot turn into RGB
        raise DataError(f"Cannot convert image {path} (mode {image.mode}) to RGB: {exc}. Save it as an 8-bit RGB or grey image.") from None
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


def read_mask(path: str | Path, expected_size: tuple[int, int] | None = None, image: str | Path | None = None) -> np.ndarray:
    """The mask decoded whole, as a height x width bool array (nonzero = defect).

    expected_size is the (width, height) of the image the mask belongs to (`image`, named in the
    error); a mismatch is an error because a mask of another size usually belongs to another
    image or another resolution.
    """
    path = Path(path)
    mask = _open(path, what="mask")
    if expected_size is not None and mask.size != tuple(expected_size):
        raise DataError(
            f"Mask {path} is {mask.size[0]}x{mask.size[1]} but its image{f' {image}' if image else ''} is "
            f"{expected_size[0]}x{expected_size[1]}. Masks must have the size of their image."
        )
    return np.asarray(mask.convert("L") if mask.mode not in _SIXTEEN_BIT_MODES | {"F"} else mask) > 0


def load_mask(
    path: str | Path, size: int | Sequence[int], expected_size: tuple[int, int] | None = None, resampling: str = "cover",
    image: str | Path | None = None,
) -> torch.Tensor:
    """1 x height x width float tensor of 0/1 (see resize_mask for the resampling; read_mask for
    expected_size and image)."""
    return resize_mask(torch.from_numpy(read_mask(path, expected_size, image)), size, resampling)
