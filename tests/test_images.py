from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from defectflow.data.images import load_image, load_mask
from defectflow.errors import DataError


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P", "CMYK"])
def test_any_8bit_mode_loads_as_rgb_at_size(tmp_path: Path, mode: str) -> None:
    array = np.full((40, 60, 3), 200, dtype=np.uint8)
    path = tmp_path / f"x.{'jpg' if mode == 'CMYK' else 'png'}"
    Image.fromarray(array).convert(mode).save(path)
    image = load_image(path, 32)
    assert image.shape == (3, 32, 32)
    assert image.dtype == torch.float32
    assert 0.7 < image.mean().item() < 0.85  # 200/255 = 0.78, whatever the mode


def test_16bit_image_uses_full_range(tmp_path: Path) -> None:
    array = np.full((20, 20), 65535 // 2, dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(array).save(path)
    assert Image.open(path).mode.startswith("I")
    image = load_image(path, 32)
    assert image.shape == (3, 32, 32)
    assert abs(image.mean().item() - 0.5) < 0.01


@pytest.mark.parametrize(("suffix", "dtype"), [(".png", np.uint16), (".tif", np.int32)])
def test_dark_16bit_image_stays_dark(tmp_path: Path, suffix: str, dtype: type) -> None:
    # values an 8-bit image could hold, in a 16-bit (or 32-bit integer) file: a dark frame, not a bright one
    path = tmp_path / f"dark{suffix}"
    Image.fromarray(np.full((20, 20), 200, dtype=dtype)).save(path)
    assert Image.open(path).mode.startswith("I")
    assert load_image(path, 32).max().item() == pytest.approx(200 / 65535, abs=1e-6)


def test_corrupt_image_error_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.png"
    good = tmp_path / "good.png"
    Image.fromarray(np.zeros((50, 50, 3), dtype=np.uint8)).save(good)
    path.write_bytes(good.read_bytes()[:60])  # truncated PNG
    with pytest.raises(DataError, match="broken.png"):
        load_image(path, 32)


def test_text_file_is_not_an_image(tmp_path: Path) -> None:
    path = tmp_path / "notes.png"
    path.write_text("hello")
    with pytest.raises(DataError, match="notes.png"):
        load_image(path, 32)


def test_mask_resizes_with_nearest_and_binarises(tmp_path: Path) -> None:
    array = np.zeros((64, 64), dtype=np.uint8)
    array[:32] = 17  # any non-zero value is defect
    path = tmp_path / "m.png"
    Image.fromarray(array).save(path)
    mask = load_mask(path, 16, expected_size=(64, 64))
    assert mask.shape == (1, 16, 16)
    assert set(mask.unique().tolist()) == {0.0, 1.0}
    assert mask[0, :8].min() == 1 and mask[0, 8:].max() == 0


def test_mask_of_another_size_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "m.png"
    Image.fromarray(np.zeros((10, 12), dtype=np.uint8)).save(path)
    with pytest.raises(DataError, match=r"m.png is 12x10 but its image is 64x64"):
        load_mask(path, 16, expected_size=(64, 64))
