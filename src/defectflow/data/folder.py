"""Datasets in the MVTec AD folder layout (and BTAD's naming of it).

    <root>/train/good/*.png                      normal training images ("ok" in BTAD)
    <root>/test/good/*.png, <root>/test/<type>/  normal and defective test images
    <root>/ground_truth/<type>/<stem>_mask.png   pixel masks (BTAD: <stem>.png or <stem>.bmp)

A category without a ground_truth folder is evaluated at image level only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ..errors import DataError
from .images import IMAGE_EXTENSIONS, Size, as_size, check_min_size, image_size, load_mask, read_image, read_mask, resize_image, to_tensor

GOOD_NAMES = ("good", "ok")
_MASK_PATTERNS = ("{stem}_mask.png", "{stem}.png", "{stem}.bmp", "{stem}_mask.bmp", "{stem}_mask.tif", "{stem}.tif")


@dataclass(frozen=True)
class Sample:
    """One image on disk (or in memory: then path is a name like <array 0> and image holds it).
    label is 0 for a normal part, 1 for a defective one, -1 unknown."""

    path: Path
    label: int
    defect_type: str
    mask_path: Path | None = None
    image: torch.Tensor | None = field(default=None, compare=False, repr=False)

    def read(self) -> torch.Tensor:
        """3 x H x W in [0, 1] at the image's own resolution."""
        return read_image(self.path) if self.image is None else self.image


def _visible(path: Path) -> bool:
    """Not a hidden file or folder: macOS resource forks (._x.png), .DS_Store, .ipynb_checkpoints,
    and defectflow's own half-written files are never taken as images or categories."""
    return not path.name.startswith(".")


def list_images(folder: Path) -> list[Path]:
    """Image files in a folder, sorted; an error naming the folder when there are none."""
    if not folder.is_dir():
        raise DataError(f"Folder not found: {folder}")
    images = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and _visible(p))
    if not images:
        raise DataError(f"No images ({', '.join(IMAGE_EXTENSIONS)}) in {folder}")
    return images


def _good_folder(split_dir: Path) -> Path | None:
    for name in GOOD_NAMES:
        if (split_dir / name).is_dir():
            return split_dir / name
    return None


def _find_mask(ground_truth: Path, defect_type: str, image: Path) -> Path:
    candidates = [ground_truth / defect_type / pattern.format(stem=image.stem) for pattern in _MASK_PATTERNS]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise DataError(
        f"No mask for defective image {image}: expected {candidates[0]} "
        f"(or {', '.join(c.name for c in candidates[1:])}). Add the mask, or remove {ground_truth} "
        "to evaluate this category at image level only."
    )


def scanned_folders(root: str | Path) -> list[Path]:
    """The folders of a category that AnomalyFolder.scan reads: an output written inside one
    would be read back as data (a picture of a defect as a good training image)."""
    return [Path(root) / name for name in ("train", "test", "ground_truth")]


@dataclass(frozen=True)
class AnomalyFolder:
    """The train and test samples of one category folder."""

    root: Path
    train: tuple[Sample, ...]
    test: tuple[Sample, ...]
    has_masks: bool

    @property
    def name(self) -> str:
        return self.root.name

    @classmethod
    def scan(cls, root: str | Path, require_test: bool = True, require_train: bool = True) -> "AnomalyFolder":
        """The category at root; evaluation alone needs no training images (require_train False)."""
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"Dataset folder not found: {root}")
        train_dir = root / "train"
        good = _good_folder(train_dir)
        if good is None and (require_train or not (root / "test").is_dir()):
            raise DataError(
                f"{root} is not in the MVTec AD layout: expected normal training images in "
                f"{train_dir / 'good'} (or {train_dir / 'ok'} as in BTAD)."
            )
        train = () if good is None else tuple(Sample(p, 0, good.name) for p in list_images(good))
        test = cls._scan_test(root) if require_test or (root / "test").is_dir() else ()
        has_masks = (root / "ground_truth").is_dir()
        return cls(root=root, train=train, test=test, has_masks=has_masks)

    @staticmethod
    def _scan_test(root: Path) -> tuple[Sample, ...]:
        test_dir = root / "test"
        if not test_dir.is_dir():
            raise DataError(f"Test folder not found: {test_dir} (expected test/good and test/<defect type>).")
        ground_truth = root / "ground_truth"
        samples: list[Sample] = []
        for type_dir in sorted(p for p in test_dir.iterdir() if p.is_dir() and _visible(p)):
            is_good = type_dir.name in GOOD_NAMES
            for image in list_images(type_dir):
                if is_good:
                    samples.append(Sample(image, 0, type_dir.name))
                else:
                    mask = _find_mask(ground_truth, type_dir.name, image) if ground_truth.is_dir() else None
                    samples.append(Sample(image, 1, type_dir.name, mask))
        if not samples:
            raise DataError(f"No test images in {test_dir}")
        return tuple(samples)

    def check_test_split(self) -> None:
        """Every test image's header readable, and every mask decoded whole and the size of its
        image: `run` and `eval` check this before their long work, not after it (masks are few
        and small; the images are scored where they fail, as FAILED)."""
        for sample in self.test:
            size = image_size(sample.path)
            if sample.mask_path is not None:
                read_mask(sample.mask_path, expected_size=size, image=sample.path)


class ImageDataset(Dataset):
    """Loads samples as {"image": 3xHxW in [0,1], "mask": 1xHxW of 0/1, "label", "index", "error"}.

    Normal images get an all-zero mask; defective images without a mask get an all-zero mask too,
    and the caller knows from AnomalyFolder.has_masks that pixel metrics are not available.
    With tolerate=True an image that cannot be read comes back as zeros with its reason in
    "error" (empty otherwise), so one bad file does not stop the others from being scored.
    """

    def __init__(
        self, samples: Sequence[Sample], size: int | Sequence[int], mask_resampling: str = "cover", tolerate: bool = False
    ) -> None:
        self.samples = list(samples)
        self.size = as_size(size)
        self.mask_resampling = mask_resampling
        self.tolerate = tolerate

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        sample = self.samples[index]
        try:
            full = sample.read()
        except DataError as exc:
            if not self.tolerate:
                raise
            blank = torch.zeros(1, *self.size)
            return {"image": blank.expand(3, -1, -1).clone(), "mask": blank, "label": sample.label, "index": index, "error": str(exc)}
        height, width = full.shape[-2:]
        mask = load_sample_mask(sample, self.size, full_size=(width, height), resampling=self.mask_resampling)
        return {"image": resize_image(full, self.size), "mask": mask, "label": sample.label, "index": index, "error": ""}


def load_sample_mask(
    sample: Sample, size: int | Sequence[int], full_size: tuple[int, int] | None = None, resampling: str = "cover"
) -> torch.Tensor:
    """1 x H x W mask of a sample (zeros without a mask file), checked against its image's
    (width, height); that size is read from the image file's header when not given."""
    if sample.mask_path is None:
        return torch.zeros(1, *as_size(size))
    return load_mask(sample.mask_path, size, expected_size=full_size or image_size(sample.path), resampling=resampling,
                     image=sample.path)


def sample_size(sample: Sample) -> tuple[int, int]:
    """(width, height) of a sample's image: from the file's header, or of the image in memory."""
    return image_size(sample.path) if sample.image is None else (int(sample.image.shape[2]), int(sample.image.shape[1]))


def fitted_size(samples: Sequence[Sample], short_side: int, multiple: int = 32) -> Size:
    """(height, width) with the samples' median aspect ratio: the short side at short_side, the
    long side rounded to a multiple of `multiple`. Read from the files' headers, no decoding."""
    if not samples:
        raise DataError("No images to take the input size from.")
    sizes = [sample_size(s) for s in samples]
    ratio = float(np.median([max(w, h) / min(w, h) for w, h in sizes]))
    long_side = max(short_side, multiple * round(short_side * ratio / multiple))
    landscape = sum(w > h for w, h in sizes) * 2 > len(sizes)
    return (short_side, long_side) if landscape else (long_side, short_side)


def load_images(samples: Sequence[Sample], size: int | Sequence[int], progress: bool = False) -> torch.Tensor:
    """N x 3 x H x W: the samples' images, loaded once (for methods that reuse them every epoch)."""
    return torch.stack([resize_image(s.read(), size) for s in tqdm(samples, desc="load images", disable=not progress, leave=False)])


def check_training_images(samples: Sequence[Sample]) -> None:
    """Refuse, from the headers, training images too small to learn from (a 1x1 icon, a thumbnail)."""
    if not samples:
        raise DataError("No training images given: fit() needs good images (a category folder or a list of image paths).")
    for sample in samples:
        check_min_size(sample.path, sample_size(sample))


IN_MEMORY = (np.ndarray, Image.Image, torch.Tensor)


def samples_from_paths(paths: Sequence[Any]) -> list[Sample]:
    """Unlabelled samples for prediction: files as given, folders expanded to their images, and
    images in memory (numpy arrays, PIL images, tensors) named <array i> by their place in the list."""
    samples: list[Sample] = []
    for index, raw in enumerate(paths):
        if isinstance(raw, IN_MEMORY):
            name = f"<array {index}>"
            samples.append(Sample(Path(name), -1, "", image=to_tensor(raw, name)))
            continue
        if not isinstance(raw, (str, os.PathLike)):
            raise DataError(f"Item {index} of the images is a {type(raw).__name__}: give paths, folders, numpy arrays or PIL images.")
        path = Path(raw)
        if path.is_dir():
            samples.extend(Sample(p, -1, "") for p in list_images(path))
        elif path.is_file():
            samples.append(Sample(path, -1, ""))
        else:
            raise DataError(f"Not found: {path}")
    return samples
