from pathlib import Path

import pytest

from defectflow.data.folder import AnomalyFolder, ImageDataset, samples_from_paths
from defectflow.data.named import category_root
from defectflow.errors import DataError

from conftest import write_image, write_mask


def test_scans_real_mvtec_category(bottle: Path) -> None:
    folder = AnomalyFolder.scan(bottle)
    assert len(folder.train) == 209
    assert len(folder.test) == 83
    assert folder.has_masks
    defective = [s for s in folder.test if s.label == 1]
    assert len(defective) == 63
    assert {s.defect_type for s in defective} == {"broken_large", "broken_small", "contamination"}
    assert all(s.mask_path is not None and s.mask_path.name == f"{s.path.stem}_mask.png" for s in defective)
    item = ImageDataset(defective[:1], 256)[0]
    assert item["image"].shape == (3, 256, 256) and item["mask"].sum() > 0 and item["label"] == 1


def test_named_dataset_resolves_category(bottle: Path) -> None:
    assert category_root("mvtec", bottle.parent, "bottle") == bottle
    with pytest.raises(DataError, match="Unknown mvtec category 'bottel'"):
        category_root("mvtec", bottle.parent, "bottel")
    with pytest.raises(DataError, match="defectflow download btad"):
        category_root("btad", bottle.parent, "01")


def test_btad_naming_ok_ko_and_bmp_masks(tmp_path: Path) -> None:
    root = tmp_path / "01"
    write_image(root / "train" / "ok" / "0000.bmp")
    write_image(root / "test" / "ok" / "0001.bmp")
    write_image(root / "test" / "ko" / "0002.bmp")
    write_mask(root / "ground_truth" / "ko" / "0002.bmp")
    folder = AnomalyFolder.scan(root)
    assert [s.label for s in folder.test] == [1, 0]  # ko sorts before ok
    assert folder.test[0].mask_path.name == "0002.bmp"


def test_category_without_masks_is_image_level(tiny_folder: Path) -> None:
    import shutil

    shutil.rmtree(tiny_folder / "ground_truth")
    folder = AnomalyFolder.scan(tiny_folder)
    assert not folder.has_masks
    assert all(s.mask_path is None for s in folder.test)


def test_missing_mask_error_names_image_and_expected_mask(tiny_folder: Path) -> None:
    (tiny_folder / "ground_truth" / "scratch" / "001_mask.png").unlink()
    with pytest.raises(DataError, match=r"test/scratch/001.png.*001_mask.png"):
        AnomalyFolder.scan(tiny_folder)


def test_mask_size_mismatch_names_mask(tiny_folder: Path) -> None:
    write_mask(tiny_folder / "ground_truth" / "scratch" / "000_mask.png", size=32, box=(0, 0, 5, 5))
    folder = AnomalyFolder.scan(tiny_folder)
    dataset = ImageDataset(folder.test, 32)
    bad = next(i for i, s in enumerate(folder.test) if s.path.name == "000.png" and s.label == 1)
    with pytest.raises(DataError, match="000_mask.png is 32x32 but its image .*scratch/000.png is 64x64"):
        dataset[bad]


def test_empty_and_missing_folders(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        AnomalyFolder.scan(tmp_path / "nothing")
    (tmp_path / "cat" / "train").mkdir(parents=True)
    with pytest.raises(DataError, match=r"train/good"):
        AnomalyFolder.scan(tmp_path / "cat")
    (tmp_path / "cat" / "train" / "good").mkdir()
    with pytest.raises(DataError, match=r"No images .* in .*train/good"):
        AnomalyFolder.scan(tmp_path / "cat")


def test_paths_and_folders_for_prediction(tiny_folder: Path) -> None:
    single = tiny_folder / "test" / "good" / "000.png"
    samples = samples_from_paths([single, tiny_folder / "test" / "scratch"])
    assert [s.path for s in samples] == [single, *sorted((tiny_folder / "test" / "scratch").glob("*.png"))]
    with pytest.raises(DataError, match="missing.png"):
        samples_from_paths([tiny_folder / "missing.png"])
