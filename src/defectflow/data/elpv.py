"""The built-in default task: real electroluminescence images of solar cells (elpv-dataset).

The package ships 2,624 cells (300x300, greyscale) labelled with the probability of a defect by
experts. We arrange one cell type as an anomaly-detection task in the MVTec layout: training on
functional cells, testing on held-out functional cells and defective ones (probability >= 0.5;
the uncertain 1/3 cells are left out). There are no pixel masks, so evaluation is image level.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from ..errors import DataError

CELL_TYPES = ("mono", "poly")


def _package_labels() -> Path:
    try:
        import elpv_dataset
    except ImportError:
        raise DataError("The built-in default data needs the elpv-dataset package: pip install elpv-dataset") from None
    labels = Path(elpv_dataset.__file__).parent / "data" / "labels.csv"
    if not labels.is_file():
        raise DataError(f"elpv-dataset is installed but {labels} is missing; reinstall elpv-dataset.")
    return labels


def default_cache_dir() -> Path:
    base = os.environ.get("DEFECTFLOW_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "defectflow"
    )
    return Path(base)


def prepare_elpv(
    root: str | Path | None = None,
    cell_type: str = "mono",
    n_train: int = 200,
    n_test_good: int = 60,
    n_test_defective: int = 60,
    seed: int = 0,
) -> Path:
    """Write (once) the elpv task in the MVTec layout and return its folder.

    The folder is rebuilt only when its recorded parameters differ, so repeated runs reuse it.
    """
    if cell_type not in CELL_TYPES:
        raise DataError(f"Unknown cell type {cell_type!r}: choose one of {', '.join(CELL_TYPES)}.")
    root = Path(root) if root is not None else default_cache_dir() / f"elpv-{cell_type}"
    params = {"cell_type": cell_type, "n_train": n_train, "n_test_good": n_test_good,
              "n_test_defective": n_test_defective, "seed": seed}
    manifest = root / "defectflow-elpv.json"
    if manifest.is_file() and json.loads(manifest.read_text()) == params:
        return root
    if root.exists() and not manifest.is_file() and any(root.iterdir()):
        raise DataError(f"{root} exists and was not made by defectflow; choose another folder for the elpv task.")

    labels = _package_labels()
    table = np.genfromtxt(labels, dtype=["U32", "f8", "U8"], names=["path", "prob", "type"])
    of_type = table[table["type"] == cell_type]
    good = of_type[of_type["prob"] == 0.0]["path"]
    defective = of_type[of_type["prob"] >= 0.5]["path"]
    rng = np.random.default_rng(seed)
    good = rng.permutation(good)
    defective = rng.permutation(defective)
    if n_train + n_test_good > len(good) or n_test_defective > len(defective):
        raise DataError(
            f"elpv {cell_type} has {len(good)} functional and {len(defective)} defective cells; "
            f"asked for {n_train}+{n_test_good} functional and {n_test_defective} defective."
        )
    splits = {
        root / "train" / "good": good[:n_train],
        root / "test" / "good": good[n_train:n_train + n_test_good],
        root / "test" / "defective": defective[:n_test_defective],
    }
    for sub in ("train", "test"):
        shutil.rmtree(root / sub, ignore_errors=True)
    for folder, names in splits.items():
        folder.mkdir(parents=True, exist_ok=True)
        for name in names:
            shutil.copyfile(labels.parent / name, folder / Path(name).name)
    manifest.write_text(json.dumps(params, indent=2))
    return root
