"""A benchmark data set of parts whose position varies: a copy of an MVTec-layout category in which
every image (train and test) is rotated and shifted at random, its mask moved with it.

MVTec AD bottle is photographed from above, centred: rotated about its centre and shifted by up to
12% of the frame it is still a plausible bottle, but no place in the frame holds the same part of it
from one image to the next. That is what the per-place normal level (position_reference) cannot
assume, and what the tool is judged on with products we do not have. The copy is written once under
the cache (never into the repository) and reused while its parameters are the same.

    python benchmarks/moved_parts.py ../shared/data/mvtec/bottle   # prints the folder
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from defectflow.data.elpv import default_cache_dir
from defectflow.data.images import IMAGE_EXTENSIONS


def moved_copy(source: Path, root: Path | None = None, rotation: float = 180.0, shift: float = 0.12) -> Path:
    """Write (once) the moved copy of `source` and return its folder. Each image's move is drawn
    from its relative path, so train and test are moved alike and a rerun gives the same images."""
    source = Path(source)
    root = Path(root) if root is not None else default_cache_dir() / f"{source.name}-moved"
    params = {"source": str(source.resolve()), "rotation": rotation, "shift": shift}
    manifest = root / "defectflow-moved.json"
    if manifest.is_file() and json.loads(manifest.read_text()) == params:
        return root
    images = (p for split in ("train", "test") for p in sorted((source / split).rglob("*")) if p.suffix.lower() in IMAGE_EXTENSIONS)
    for path in images:
        relative = path.relative_to(source)
        rng = random.Random(str(relative))
        image = Image.open(path)
        width, height = image.size
        angle = rng.uniform(-rotation, rotation)
        move = dict(angle=angle, translate=(int(rng.uniform(-shift, shift) * width), int(rng.uniform(-shift, shift) * height)))
        grey = np.asarray(image.convert("L"))
        # what the corners uncovered by the move show: the frame's usual border
        border = int(np.median(np.concatenate([grey[0], grey[-1], grey[:, 0], grey[:, -1]])))
        fill = border if len(image.getbands()) == 1 else (border,) * len(image.getbands())
        _save(image.rotate(resample=Image.BILINEAR, fillcolor=fill, **move), root / relative)
        if relative.parts[1] != "good" and relative.parts[0] == "test":
            mask = Path("ground_truth", relative.parts[1], f"{path.stem}_mask.png")
            _save(Image.open(source / mask).rotate(resample=Image.NEAREST, fillcolor=0, **move), root / mask)
    manifest.write_text(json.dumps(params))
    return root


def _save(image: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


if __name__ == "__main__":
    print(moved_copy(Path(sys.argv[1])))
