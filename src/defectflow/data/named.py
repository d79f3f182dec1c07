"""Named datasets: where a category of MVTec AD or BTAD lives under a root folder."""

from __future__ import annotations

from pathlib import Path

from ..errors import DataError

MVTEC_CATEGORIES = (
    "bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut",
    "pill", "screw", "tile", "toothbrush", "transistor", "wood", "zipper",
)
BTAD_CATEGORIES = ("01", "02", "03")
DATASETS = {"mvtec": MVTEC_CATEGORIES, "btad": BTAD_CATEGORIES}
# Folder names the official archives unpack to, tried below the root the user gives.
_ARCHIVE_DIRS = {"mvtec": ("mvtec_anomaly_detection", "mvtec"), "btad": ("BTech_Dataset_transformed", "btad")}


def category_root(dataset: str, root: str | Path, category: str | None = None) -> Path:
    """The folder of one category. 'folder' means root itself is the category folder."""
    root = Path(root)
    if dataset == "folder":
        return root
    if dataset not in DATASETS:
        raise DataError(f"Unknown dataset {dataset!r}: choose one of folder, {', '.join(DATASETS)}.")
    if category not in DATASETS[dataset]:
        raise DataError(
            f"Unknown {dataset} category {category!r}: choose one of {', '.join(DATASETS[dataset])}."
        )
    for base in (root, *(root / sub for sub in _ARCHIVE_DIRS[dataset])):
        if (base / category).is_dir():
            return base / category
    raise DataError(
        f"Category folder {root / category} not found. Run `defectflow download {dataset} --root {root}` "
        "or point --root at the folder that holds the categories."
    )
