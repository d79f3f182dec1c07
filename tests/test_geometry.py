"""Image geometry: non-square sizes through every method, export and checkpoint; masks that keep
every defect region; tiled extraction."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

import defectflow
from conftest import link_bottle_slice
from defectflow.checkpoint import CONFIG_FILE, read_checkpoint, save_checkpoint
from defectflow.data.folder import AnomalyFolder, Sample, fitted_size
from defectflow.data.images import resize_mask
from defectflow.errors import ConfigError
from defectflow.export import export_onnx
from defectflow.features.extractor import FeatureExtractor
from defectflow.features.tiling import tile_spans

EIGHT = np.ones((3, 3), dtype=int)  # 8-connectivity, as the PRO metric counts regions


def _tall_folder(bottle: Path, root: Path, width: int = 160, height: int = 352) -> AnomalyFolder:
    """Real bottle crops, made tall (height x width), with a mask per defective image."""
    def crop(source: Path, target: Path) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        image = Image.open(source)
        image.crop((270, 100, 270 + 360, 100 + 792)).resize((width, height)).save(target)

    for i, path in enumerate(sorted((bottle / "train" / "good").glob("*.png"))[:10]):
        crop(path, root / "train" / "good" / f"{i:03d}.png")
    for i, path in enumerate(sorted((bottle / "test" / "good").glob("*.png"))[:2]):
        crop(path, root / "test" / "good" / f"{i:03d}.png")
    for i, path in enumerate(sorted((bottle / "test" / "broken_large").glob("*.png"))[:2]):
        crop(path, root / "test" / "broken_large" / f"{i:03d}.png")
        mask = bottle / "ground_truth" / "broken_large" / f"{path.stem}_mask.png"
        crop(mask, root / "ground_truth" / "broken_large" / f"{i:03d}_mask.png")
    return AnomalyFolder.scan(root)


def test_fitted_size_keeps_the_aspect_ratio(tmp_path: Path) -> None:
    samples = []
    for i, (w, h) in enumerate([(500, 1240), (500, 1260), (500, 1271)]):
        path = tmp_path / f"{i}.png"
        Image.new("L", (w, h)).save(path)
        samples.append(Sample(path, 0, "good"))
    assert fitted_size(samples, 256) == (640, 256)  # 2.52 x 256 = 645 -> 640, a multiple of 32
    Image.new("L", (1260, 500)).save(tmp_path / "wide.png")
    assert fitted_size([Sample(tmp_path / "wide.png", 0, "good")], 256) == (256, 640)
    Image.new("L", (900, 900)).save(tmp_path / "square.png")
    assert fitted_size([Sample(tmp_path / "square.png", 0, "good")], 256) == (256, 256)


def test_input_size_takes_one_or_two_multiples_of_32() -> None:
    assert defectflow.create("cflow", input_size=(320, 800)).image_size == (320, 800)
    assert defectflow.create("cflow", input_size=256).config.input_size == (256,)
    for wrong in [(320, 100), (32, 64, 96), (16,), ()]:
        with pytest.raises(ConfigError, match="input_size"):
            defectflow.create("cflow", input_size=wrong)
    with pytest.raises(ConfigError, match="fixes the long side"):
        defectflow.create("cflow", input_size=256).image_size


def test_a_hairline_crack_stays_one_region_when_the_mask_is_downscaled() -> None:
    """A 1-pixel-wide crack across a 1260 x 500 mask, downscaled to the map's 640 x 256."""
    mask = np.zeros((1260, 500), dtype=bool)
    rows = np.arange(100, 1100)
    mask[rows, (150 + 0.3 * (rows - 100)).astype(int)] = True  # a slanted line, one pixel wide
    assert ndimage.label(mask, EIGHT)[1] == 1
    cover = resize_mask(torch.from_numpy(mask), (640, 256), "cover")[0].numpy() > 0
    assert ndimage.label(cover, EIGHT)[1] == 1
    # and it does not swell: at most a few output pixels wide (the crack crosses ~0.3 px per row)
    assert cover.sum(axis=1).max() <= 3
    # the papers' nearest-neighbour resize breaks the same crack up (why "cover" is the default)
    nearest = resize_mask(torch.from_numpy(mask), (640, 256), "nearest")[0].numpy() > 0
    assert ndimage.label(nearest, EIGHT)[1] > 1


def test_tile_spans_cover_the_axis_once_on_the_coarsest_grid() -> None:
    for length, tile, overlap in [(1248, 256, 64), (512, 256, 128), (640, 320, 0), (256, 256, 64), (224, 256, 64)]:
        spans = tile_spans(length, tile, overlap)
        assert spans[0][1] == 0 and spans[-1][2] == length
        for (start, low, high), following in zip(spans, spans[1:] + [None]):
            assert start <= low < high <= start + tile and low % 32 == 0 and high % 32 == 0 or length <= tile
            if following is not None:
                assert following[1] == high  # no gap, no double cover


def test_tiled_extraction_matches_untiled_where_receptive_fields_fit(bottle: Path) -> None:
    image = torch.from_numpy(np.asarray(Image.open(sorted((bottle / "train" / "good").glob("*.png"))[0]).resize((512, 384)),
                                        dtype=np.float32) / 255).permute(2, 0, 1)[None]
    extractor = FeatureExtractor("tf_efficientnet_lite0", (1, 2, 3), tile=256, overlap=128).eval()
    with torch.no_grad():
        untiled, tiled = extractor._untiled(image), extractor(image)
        whole = FeatureExtractor("tf_efficientnet_lite0", (1, 2, 3), tile=512, overlap=128).eval()(image)
    for a, b in zip(untiled, whole):  # one tile that holds the image: the same features
        torch.testing.assert_close(a, b)
    assert [f.shape for f in tiled] == [f.shape for f in untiled]
    for level, (a, b) in enumerate(zip(untiled, tiled)):
        relative = ((a - b).norm(dim=1) / a.norm(dim=1).clamp_min(1e-6)).flatten()
        # stride 4 and 8: receptive fields fit in the overlap, the same features; stride 16: close
        assert relative.quantile(0.99) < (1e-3 if level < 2 else 0.5), (level, relative.quantile(0.99))


TINY = {
    "cflow": dict(meta_epochs=1, sub_epochs=1, epoch_vectors=2000, fiber_batch=256, batch_size=4, val_fraction=0.2, levels=(3, 4)),
    "clscnf": dict(meta_epochs=1, sub_epochs=1, epoch_vectors=2000, fiber_batch=256, batch_size=4, val_fraction=0.2, levels=(3, 4),
                   decoder_levels=(2, 3, 4), decoder_width=16, frozen_epochs=1, joint_epochs=1),
    "differnet": dict(meta_epochs=1, sub_epochs=1, augment_copies=1, test_rotations=2, vector_batch=8, subnet_width=64,
                      batch_size=4, val_fraction=0.2),
}


@pytest.mark.slow
@pytest.mark.parametrize("method", ["cflow", "clscnf", "differnet"])
def test_non_square_images_through_every_method(method: str, bottle: Path, tmp_path: Path) -> None:
    folder = _tall_folder(bottle, tmp_path / "tall")
    detector = defectflow.create(method, input_size=64, **TINY[method]).fit(folder, progress=False)
    assert detector.image_size == (128, 64)  # 352 x 160 keeps its 2.2 aspect ratio: 64 x 2.2 = 141 -> 128
    evaluation = detector.evaluate(folder, progress=False)
    assert evaluation.prediction.maps.shape == (4, 128, 64) and evaluation.masks.shape == (4, 128, 64)
    for maps in evaluation.prediction.head_maps.values():
        assert maps.shape == (4, 128, 64)
    assert detector.validation.images.shape[-2:] == (128, 64)

    checkpoint = detector.save(tmp_path / "model")
    assert json.loads((checkpoint / CONFIG_FILE).read_text())["config"]["input_size"] == [128, 64]
    loaded = defectflow.load(checkpoint)
    again = loaded.predict(folder, progress=False)
    np.testing.assert_allclose(again.maps, evaluation.prediction.maps, atol=1e-5)
    if method != "differnet":
        export_onnx(loaded, checkpoint)
        for backend in ("onnx", "openvino"):
            exported = defectflow.load(checkpoint, backend=backend).predict(folder, progress=False)
            np.testing.assert_allclose(exported.maps, again.maps, atol=1e-4 * max(1.0, np.abs(again.maps).max()))
    if method == "cflow":  # fitted again on square images, the same detector fits their size, not the last data's
        detector.fit(link_bottle_slice(bottle, tmp_path / "square"), progress=False)
        assert detector.image_size == (64, 64) and detector.requested.input_size == (64,)


@pytest.mark.slow
def test_tiled_model_on_large_images_and_a_square_checkpoint_of_the_earlier_format_loads(bottle: Path, tmp_path: Path) -> None:
    folder = _tall_folder(bottle, tmp_path / "tall")
    tiled = defectflow.create("cflow", input_size=(352, 160), tile_size=128, tile_overlap=64, **TINY["cflow"]).fit(folder, progress=False)
    prediction = tiled.predict(folder, progress=False)
    assert prediction.maps.shape == (4, 352, 160) and np.isfinite(prediction.maps).all()
    reloaded = defectflow.load(tiled.save(tmp_path / "tiled"))
    assert reloaded.model.extractor.tile == 128
    np.testing.assert_allclose(reloaded.predict(folder, progress=False).maps, prediction.maps, atol=1e-5)

    # a checkpoint written before sizes had two sides: input_size a number, no tiling or mask options
    square = defectflow.create("cflow", input_size=64, **TINY["cflow"]).fit(folder, progress=False)
    meta, state = read_checkpoint(square.save(tmp_path / "new"))
    config = dict(meta["config"], input_size=64)
    for key in ("tile_size", "tile_overlap", "mask_resampling", "position_reference", "train_precision"):
        config.pop(key)
    # nor a frame guard or per-pixel normal levels
    state = {name: value for name, value in state.items() if not name.startswith(("guard.", "scorer.position_low"))}
    old = save_checkpoint(tmp_path / "old", "cflow", config, state, extra={k: meta[k] for k in ("thresholds", "trained_on")})
    with pytest.warns(UserWarning, match="predates the frame guard"):
        loaded = defectflow.load(old)
    assert loaded.image_size == (64, 64) and loaded.config.mask_resampling == "cover"
    assert loaded.config.position_reference == "off" and not loaded.model.scorer.position_low.any()
    assert loaded.config.train_precision == "fp32"  # how checkpoints before the option were trained
    assert loaded.predict(folder, progress=False).maps.shape == (4, 64, 64)
