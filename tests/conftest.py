"""Shared fixtures. Real images come from ../shared/data/mvtec/bottle (read-only); small
synthetic folders are written to tmp_path. Backbone weights come from ../shared/hf-home."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DEFECTFLOW_SHARED", REPO.parent / "shared"))
BOTTLE = SHARED / "data" / "mvtec" / "bottle"

os.environ.setdefault("HF_HOME", str(SHARED / "hf-home"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import defectflow  # noqa: E402 - after the environment it reads

defectflow.keep_freed_memory()  # the tests' large tensors reuse freed memory, as under the CLI (memory.py)


@pytest.fixture(scope="session")
def bottle() -> Path:
    if not BOTTLE.is_dir():
        pytest.fail(f"Real test data missing: {BOTTLE} (the shared folder must sit beside the checkout)")
    return BOTTLE


def write_image(path: Path, size: int = 64, seed: int = 0, mode: str = "RGB") -> Path:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    array = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(array).convert(mode).save(path)
    return path


def write_mask(path: Path, size: int = 64, box: tuple[int, int, int, int] = (10, 10, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.zeros((size, size), dtype=np.uint8)
    x0, y0, x1, y1 = box
    array[y0:y1, x0:x1] = 255
    Image.fromarray(array).save(path)
    return path


def link_bottle_slice(bottle: Path, root: Path) -> Path:
    """A category folder at root of symlinks to 6 train and 4 test images (2 good, 2 broken_large) of the real bottle."""
    picks = {
        "train/good": sorted((bottle / "train" / "good").glob("*.png"))[:6],
        "test/good": sorted((bottle / "test" / "good").glob("*.png"))[:2],
        "test/broken_large": sorted((bottle / "test" / "broken_large").glob("*.png"))[:2],
        "ground_truth/broken_large": sorted((bottle / "ground_truth" / "broken_large").glob("*.png"))[:2],
    }
    for folder, files in picks.items():
        (root / folder).mkdir(parents=True)
        for f in files:
            (root / folder / f.name).symlink_to(f)
    return root


@pytest.fixture
def tiny_folder(tmp_path: Path) -> Path:
    """A category in the MVTec layout: 4 train, 2 good + 2 defective test images, masks."""
    root = tmp_path / "widget"
    for i in range(4):
        write_image(root / "train" / "good" / f"{i:03d}.png", seed=i)
    for i in range(2):
        write_image(root / "test" / "good" / f"{i:03d}.png", seed=10 + i)
        write_image(root / "test" / "scratch" / f"{i:03d}.png", seed=20 + i)
        write_mask(root / "ground_truth" / "scratch" / f"{i:03d}_mask.png")
    return root


@pytest.fixture(scope="session")
def small_bottle(bottle: Path):
    """12-16 real training images and 3 good + 3 broken_large test images of bottle (no copy)."""
    from defectflow.data.folder import AnomalyFolder

    full = AnomalyFolder.scan(bottle)
    test = [s for s in full.test if s.defect_type == "good"][:3] + [s for s in full.test if s.defect_type == "broken_large"][:3]
    return AnomalyFolder(root=bottle, train=full.train[:16], test=tuple(test), has_masks=True)


def top_mean(maps: np.ndarray, area: int) -> np.ndarray:
    """The mean of each map's `area` highest pixels (the `top` image score), computed apart from the tool."""
    return np.sort(maps.reshape(len(maps), -1), axis=1)[:, -area:].mean(axis=1)
