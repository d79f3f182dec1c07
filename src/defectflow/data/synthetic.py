"""Synthetic defects in the style of DRAEM: Perlin-noise shapes filled with a texture.

A defect is a thresholded, rotated Perlin-noise mask at a random scale. Inside it, the image is
replaced by a texture (a DTD image, another normal image of the category, or a texture made
here), changed in colour, contrast, sharpness or by posterising, and blended with the original
by a random factor beta in [0, 0.8]. The training target is the mask weighted by how visible
the defect is, (1 - beta): a soft target for binary cross-entropy.

Everything is drawn from a torch.Generator, so one seed gives the same defects every time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF

from ..files import save_png
from .folder import Sample, list_images
from .images import IMAGE_EXTENSIONS, Size, as_size, load_image


def _uniform(generator: torch.Generator, low: float = 0.0, high: float = 1.0) -> float:
    return low + (high - low) * torch.rand((), generator=generator).item()


def _randint(generator: torch.Generator, low: int, high: int) -> int:
    """Integer in [low, high]."""
    return int(torch.randint(low, high + 1, (), generator=generator))


def perlin_noise(height: int, width: int, res_y: int, res_x: int, generator: torch.Generator) -> torch.Tensor:
    """2-D gradient noise with res_y x res_x lattice cells, roughly in [-1, 1].

    height and width must be multiples of the resolutions.
    """
    cell_y, cell_x = height // res_y, width // res_x
    angles = 2 * math.pi * torch.rand(res_y + 1, res_x + 1, generator=generator)
    gradients = torch.stack((torch.cos(angles), torch.sin(angles)), dim=-1)
    ys = torch.arange(height) / cell_y
    xs = torch.arange(width) / cell_x
    iy, ix = ys.long().clamp(max=res_y - 1), xs.long().clamp(max=res_x - 1)
    fy, fx = (ys - iy)[:, None], (xs - ix)[None, :]

    def corner(dy: int, dx: int) -> torch.Tensor:
        g = gradients[iy + dy][:, ix + dx]  # H x W x 2
        return g[..., 0] * (fy - dy) + g[..., 1] * (fx - dx)

    def fade(t: torch.Tensor) -> torch.Tensor:
        return t * t * t * (t * (t * 6 - 15) + 10)

    wy, wx = fade(fy), fade(fx)
    top = corner(0, 0) * (1 - wx) + corner(0, 1) * wx
    bottom = corner(1, 0) * (1 - wx) + corner(1, 1) * wx
    return math.sqrt(2) * (top * (1 - wy) + bottom * wy)


def _noise_grid(size: Size) -> tuple[int, int, int]:
    """(cell, rows, columns): noise is made on rows x columns squares of a power-of-two side
    `cell` that covers the short side, then cropped; a long image gets more squares, not larger
    blobs, so defects have the same scale relative to the short side whatever the aspect ratio."""
    cell = 1 << max(min(size) - 1, 1).bit_length()
    return cell, -(-size[0] // cell), -(-size[1] // cell)


def perlin_mask(size: int | Sequence[int], generator: torch.Generator, max_scale_exp: int = 6, threshold: float = 0.5) -> torch.Tensor:
    """height x width binary mask: Perlin noise at scale 2^a x 2^b (a, b in 0..6) per square of
    the short side, rotated, thresholded."""
    height, width = size = as_size(size)
    cell, rows, columns = _noise_grid(size)
    res_y, res_x = (min(1 << _randint(generator, 0, max_scale_exp), cell) for _ in range(2))
    noise = perlin_noise(rows * cell, columns * cell, rows * res_y, columns * res_x, generator)
    angle = _uniform(generator, -90.0, 90.0)
    noise = TF.rotate(noise[None], angle, interpolation=TF.InterpolationMode.BILINEAR)[0]
    return (noise[:height, :width] > threshold).float()


def generated_texture(size: int | Sequence[int], generator: torch.Generator) -> torch.Tensor:
    """3 x height x width texture made from scratch: two random colours mixed by Perlin noise, plus grain."""
    height, width = size = as_size(size)
    cell, rows, columns = _noise_grid(size)
    res = 1 << _randint(generator, 1, 5)
    mix = perlin_noise(rows * cell, columns * cell, rows * res, columns * res, generator)[:height, :width].add(1).div(2).clamp(0, 1)
    colours = torch.rand(2, 3, 1, 1, generator=generator)
    grain = 0.1 * torch.randn(3, height, width, generator=generator)
    return (colours[0] * mix + colours[1] * (1 - mix) + grain).clamp(0, 1)


def augment_source(texture: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Three random changes of colour, contrast, sharpness, brightness or posterising."""
    operations = [
        lambda t: TF.adjust_hue(t, _uniform(generator, -0.5, 0.5)),
        lambda t: TF.adjust_saturation(t, _uniform(generator, 0.0, 2.0)),
        lambda t: TF.adjust_contrast(t, _uniform(generator, 0.5, 2.0)),
        lambda t: TF.adjust_sharpness(t, _uniform(generator, 0.0, 4.0)),
        lambda t: TF.adjust_brightness(t, _uniform(generator, 0.6, 1.4)),
        lambda t: TF.posterize((t * 255).to(torch.uint8), _randint(generator, 2, 5)).float() / 255,
        lambda t: TF.solarize(t, _uniform(generator, 0.3, 1.0)),
        lambda t: 1.0 - t,
    ]
    order = torch.randperm(len(operations), generator=generator)[:3].tolist()
    for index in order:
        texture = operations[index](texture)
    return texture.clamp(0, 1)


def foreground_mask(image: torch.Tensor, threshold: float = 0.12) -> torch.Tensor:
    """height x width 0/1 mask of the object: pixels that differ from the border's median colour.

    For object categories (a part on a plain background) this keeps defects on the part.
    """
    border = torch.cat([image[:, 0], image[:, -1], image[:, :, 0], image[:, :, -1]], dim=1)
    background = border.median(dim=1).values[:, None, None]
    mask = ((image - background).abs().amax(dim=0) > threshold).float()
    closed = -F.max_pool2d(-F.max_pool2d(mask[None, None], 9, 1, 4), 9, 1, 4)  # fill small holes
    return closed[0, 0]


class TextureSource:
    """Where defect fillings come from: texture files (e.g. DTD) if given, else other normal
    images of the category (already loaded, N x 3 x S x S) and textures generated here, half and half."""

    def __init__(self, size: int | Sequence[int], texture_dir: str | Path | None = None, normal_images: torch.Tensor | None = None) -> None:
        self.size = as_size(size)
        self.files = list_images_recursive(Path(texture_dir)) if texture_dir is not None else []
        self.normal_images = normal_images

    def sample(self, generator: torch.Generator) -> torch.Tensor:
        if self.files:
            return load_image(self.files[_randint(generator, 0, len(self.files) - 1)], self.size)
        if self.normal_images is not None and len(self.normal_images) and _uniform(generator) < 0.5:
            image = self.normal_images[_randint(generator, 0, len(self.normal_images) - 1)]
            shift = (_randint(generator, 0, self.size[0]), _randint(generator, 0, self.size[1]))
            return torch.roll(image, shifts=shift, dims=(1, 2))
        return generated_texture(self.size, generator)


def list_images_recursive(folder: Path) -> list[Path]:
    """All images below a texture folder (DTD keeps them in one sub-folder per texture class)."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        list_images(folder)  # raises a DataError naming the folder
    return files


@dataclass
class SyntheticSample:
    image: torch.Tensor  # 3 x H x W in [0, 1]
    mask: torch.Tensor  # 1 x H x W binary: where the defect is
    target: torch.Tensor  # 1 x H x W soft target: mask * (1 - beta)


class DefectSynthesizer:
    """Adds one synthetic defect to an image, or none with probability 1 - defect_probability."""

    def __init__(
        self,
        source: TextureSource,
        defect_probability: float = 0.5,
        max_beta: float = 0.8,
        use_foreground: bool = False,
        max_tries: int = 10,
    ) -> None:
        self.source = source
        self.defect_probability = defect_probability
        self.max_beta = max_beta
        self.use_foreground = use_foreground
        self.max_tries = max_tries

    def __call__(self, image: torch.Tensor, generator: torch.Generator, force: bool | None = None) -> SyntheticSample:
        """force=True always adds a defect, False never, None draws with defect_probability."""
        size = tuple(image.shape[-2:])
        add = _uniform(generator) < self.defect_probability if force is None else force
        empty = torch.zeros(1, *size)
        if not add:
            return SyntheticSample(image, empty, empty)
        region = foreground_mask(image) if self.use_foreground else None
        for _ in range(self.max_tries):  # a mask can miss the object; draw again
            mask = perlin_mask(size, generator)
            if region is not None:
                mask = mask * region
            if mask.sum() > 0:
                break
        else:
            return SyntheticSample(image, empty, empty)
        texture = augment_source(self.source.sample(generator), generator)
        beta = _uniform(generator, 0.0, self.max_beta)
        mask = mask[None]
        blended = image * (1 - mask) + mask * ((1 - beta) * texture + beta * image)
        return SyntheticSample(blended, mask, mask * (1 - beta))


def sample_generator(seed: int, *keys: int) -> torch.Generator:
    """A generator for one sample, fixed by the run's seed and e.g. (epoch, index)."""
    value = seed
    for key in keys:
        value = value * 1_000_003 + key
    return torch.Generator().manual_seed(value % (2**63))


class SyntheticBatches(torch.utils.data.Dataset):
    """Stage 1's training batches, epoch after epoch: item k is the k-th batch of the epochs'
    shuffled orders, each image with its own synthetic defect (or none).

    A Dataset so that a DataLoader's worker processes (num_workers) make the next batches while
    one trains: on a GPU, making them in the training loop leaves it waiting (6.5 ms of one CPU
    core per 256 x 256 image). Each sample draws from its own generator (seed, epoch, index), so
    the batches are the same however many workers made them."""

    def __init__(self, images: torch.Tensor, synthesizer: DefectSynthesizer, seed: int, epochs: int, batch_size: int) -> None:
        self.images, self.synthesizer, self.seed = images, synthesizer, seed
        self.steps_per_epoch = math.ceil(len(images) / batch_size)
        self.batches = [(epoch, order[start:start + batch_size]) for epoch in range(epochs)
                        for order in [torch.randperm(len(images), generator=sample_generator(seed, epoch))]
                        for start in range(0, len(images), batch_size)]

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(images B x 3 x H x W, soft targets B x 1 x H x W)."""
        epoch, index = self.batches[k]
        made = [self.synthesizer(self.images[i], sample_generator(self.seed, epoch, int(i))) for i in index]
        return torch.stack([m.image for m in made]), torch.stack([m.target for m in made])


@dataclass
class ValidationSet:
    """Synthetic validation images: the first half clean, the second half with a defect; `clean`
    holds every held-out image as it was, before any defect (all good parts)."""

    images: torch.Tensor  # V x 3 x H x W
    masks: torch.Tensor  # V x H x W, 0/1
    labels: np.ndarray
    sources: list[Sample]
    clean: torch.Tensor  # V x 3 x H x W

    def save(self, root: str | Path) -> Path:
        """Write it in the MVTec layout (test/good, test/synthetic, ground_truth/synthetic)."""
        root = Path(root)
        for index, (image, mask, label, source) in enumerate(zip(self.images, self.masks, self.labels, self.sources)):
            kind = "synthetic" if label else "good"
            name = f"{index:03d}_{source.path.stem}"
            save_png(root / "test" / kind / f"{name}.png", image.permute(1, 2, 0).numpy())
            if label:
                save_png(root / "ground_truth" / kind / f"{name}_mask.png", mask.numpy())
        return root


def build_validation_set(samples: Sequence[Sample], images: torch.Tensor, synthesizer: DefectSynthesizer, seed: int) -> ValidationSet:
    half = len(samples) // 2
    made = [synthesizer(image, sample_generator(seed, 7919, i), force=i >= half) for i, image in enumerate(images)]
    return ValidationSet(
        images=torch.stack([m.image for m in made]),
        masks=torch.stack([m.mask[0] for m in made]),
        labels=np.array([int(i >= half) for i in range(len(samples))]),
        sources=list(samples),
        clean=images,
    )
