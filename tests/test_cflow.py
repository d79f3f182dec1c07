"""CFlow-AD end to end on a handful of real bottle images with tiny settings."""

import copy
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

import defectflow
from conftest import top_mean
from defectflow.checkpoint import read_checkpoint, save_checkpoint
from defectflow.data.folder import AnomalyFolder
from defectflow.errors import CheckpointError, ConfigError
from defectflow.methods.base import hold_out

TINY = dict(input_size=256, meta_epochs=1, sub_epochs=2, fiber_batch=512, lr=1e-3, batch_size=8)


@pytest.fixture(scope="module")
def trained(small_bottle: AnomalyFolder) -> defectflow.Detector:
    return defectflow.create("cflow", **TINY, position_reference="on").fit(small_bottle, progress=False)


def test_detects_real_defects(trained: defectflow.Detector, small_bottle: AnomalyFolder) -> None:
    evaluation = trained.evaluate(small_bottle, progress=False)
    assert evaluation.prediction.maps.shape == (6, 256, 256)
    assert evaluation.metrics["image_auroc"] >= 0.8
    assert evaluation.metrics["pixel_auroc"] >= 0.8
    assert 0 < evaluation.metrics["aupro"] <= 1
    assert trained.loss_history[-1] < trained.loss_history[0]


def test_evaluation_times_a_warm_pass(trained: defectflow.Detector, small_bottle: AnomalyFolder, monkeypatch: pytest.MonkeyPatch) -> None:
    """ms/image leaves out the first pass of each batch shape (CUDA and cuDNN set-up: seconds on a
    GPU): one untimed pass at each shape the test split runs, then the timed predict."""
    import defectflow.methods.base as base

    events: list[object] = []
    forward, clock = trained.forward_batch, base.time.perf_counter
    monkeypatch.setattr(trained.config, "batch_size", 4)  # 6 test images: batches of 4 and 2
    monkeypatch.setattr(trained, "forward_batch", lambda images: events.append(len(images)) or forward(images))
    monkeypatch.setattr(base.time, "perf_counter", lambda: events.append("clock") or clock())
    evaluation = trained.evaluate(small_bottle, progress=False)
    assert events == [2, 4, "clock", 4, 2, "clock"]
    assert evaluation.ms_per_image > 0


def test_calibration_uses_training_data_only(trained: defectflow.Detector, small_bottle: AnomalyFolder) -> None:
    """A test image's score must not depend on which other test images are scored with it."""
    together = trained.predict(list(small_bottle.test), progress=False).scores
    alone = np.array([trained.predict([s], progress=False).scores[0] for s in small_bottle.test])
    np.testing.assert_allclose(together, alone, rtol=1e-4, atol=1e-5)
    _, calibrated = hold_out(list(small_bottle.train), trained.config.val_fraction, trained.config.seed)
    train_maps = trained.predict(calibrated[:4], progress=False).maps
    assert np.median(train_maps) == pytest.approx(0.0, abs=0.5)  # normal pixels sit near 0
    assert train_maps.max() <= 1.0 + 1e-4  # the calibration images' highest pixel is 1 (a held-out image may lie above)


def test_image_score_is_relative_to_each_pixels_normal_level(trained: defectflow.Detector, small_bottle: AnomalyFolder) -> None:
    """The level is mean + 2 sd (at least 0) of the maps of the images the flows were calibrated on;
    the score is the mean of the highest pixels of the map above it over one smoothing footprint
    (201 pixels at sigma 4), and the map itself is left as it is."""
    _, kept = hold_out(list(small_bottle.train), trained.config.val_fraction, trained.config.seed)
    maps = torch.from_numpy(trained.predict(kept, progress=False).maps)
    expected = (maps.mean(dim=0) + 2 * maps.std(dim=0, correction=0)).clamp_min(0)
    level = trained.model.scorer.position_low
    torch.testing.assert_close(level, expected, atol=1e-3, rtol=1e-3)
    assert level.std() > 0.01  # a level that varies over the image, not a constant
    test = trained.predict(list(small_bottle.test), progress=False)
    assert trained.config.image_score == "top" and trained.config.smoothing_sigma == 4.0
    np.testing.assert_allclose(test.scores, top_mean(test.maps - level.numpy(), 201), rtol=1e-5, atol=1e-6)
    off = defectflow.create("cflow", **TINY, position_reference="off", image_score="max").fit(small_bottle, progress=False)
    assert not off.model.scorer.position_low.any()
    plain = off.predict(list(small_bottle.test), progress=False)
    np.testing.assert_allclose(plain.scores, plain.maps.reshape(len(plain.maps), -1).max(axis=1), rtol=1e-6)


def test_auto_keeps_the_level_where_synthetic_defects_stand_higher_with_it(trained: defectflow.Detector, bottle: Path) -> None:
    """position_reference auto compares the synthetic defects' median standing above the held-out
    good images' scores, (score - mean) / sd, with and without the level, and fixes on or off."""
    auto = copy.deepcopy(trained)
    auto.config = dataclasses.replace(auto.config, position_reference="auto")
    auto._settle_position_reference()  # 2 held-out images: too few to decide on, the level stays
    assert auto.config.position_reference == "on" and auto.position_standing is None
    validation = trained._validation_set(list(AnomalyFolder.scan(bottle).train[40:52]), progress=False)
    defective = torch.from_numpy(validation.labels == 1)
    clean, made = (trained.predict_images(images).maps for images in (validation.clean, validation.images[defective]))

    def standing(level: np.ndarray) -> float:
        good, bad = top_mean(clean - level, 201), top_mean(made - level, 201)
        return float(np.median((bad - good.mean()) / good.std(ddof=1)))

    fitted = trained.model.scorer.position_low.numpy().copy()
    # the fitted level lowers where good parts vary; its opposite raises them there and defects stand lower
    for level, expected in ((fitted, "on"), (-fitted, "off")):
        auto = copy.deepcopy(trained)
        auto.config, auto.validation = dataclasses.replace(auto.config, position_reference="auto"), validation
        auto.model.scorer.position_low.copy_(torch.from_numpy(level))
        auto._settle_position_reference()
        with_level, without = standing(level), standing(np.zeros_like(level))
        assert auto.position_standing[True] == pytest.approx(with_level, rel=1e-4)
        assert auto.position_standing[False] == pytest.approx(without, rel=1e-4)
        assert (with_level >= without) == (expected == "on") and auto.config.position_reference == expected
        assert auto.model.scorer.position_low.any() == (auto.config.position_reference == "on")
    with pytest.raises(ConfigError, match="position_reference must be one of"):
        defectflow.create("cflow", position_reference="sometimes")


def test_save_load_gives_the_same_scores(trained: defectflow.Detector, small_bottle: AnomalyFolder, tmp_path: Path) -> None:
    path = trained.save(tmp_path / "model")
    loaded = defectflow.load(path)
    assert loaded.config == trained.config
    before = trained.predict(list(small_bottle.test), progress=False)
    after = loaded.predict(list(small_bottle.test), progress=False)
    np.testing.assert_allclose(after.scores, before.scores, rtol=1e-5)
    np.testing.assert_allclose(after.maps, before.maps, rtol=1e-4, atol=1e-5)
    with pytest.raises(CheckpointError, match="already exists"):
        trained.save(path)
    # before auto, position_reference was true or false
    meta, state = read_checkpoint(path)
    for value, expected in ((True, "on"), (False, "off")):
        old = save_checkpoint(tmp_path / f"old-{value}", "cflow", dict(meta["config"], position_reference=value), state,
                              extra={k: meta[k] for k in ("thresholds", "trained_on")})
        assert defectflow.load(old).config.position_reference == expected


def test_checkpoint_of_another_shape_is_refused(trained: defectflow.Detector, tmp_path: Path) -> None:
    import json

    from defectflow.checkpoint import config_digest

    path = trained.save(tmp_path / "model")
    meta = json.loads((path / "config.json").read_text())
    meta["config"]["coupling_blocks"] = 2  # weights no longer fit the config
    meta["config_sha256"] = config_digest(meta)  # a consistent config.json, so the weights are what is checked
    (path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="do not fit"):
        defectflow.load(path)


def test_checkpoints_from_before_the_neighbourhood_score_single_cells(trained: defectflow.Detector, small_bottle: AnomalyFolder,
                                                                       tmp_path: Path) -> None:
    import json

    from defectflow.checkpoint import config_digest

    path = trained.save(tmp_path / "model")
    meta = json.loads((path / "config.json").read_text())
    del meta["config"]["flow_neighbourhood"]  # as an earlier version wrote it
    meta["config_sha256"] = config_digest(meta)
    (path / "config.json").write_text(json.dumps(meta))
    older = defectflow.load(path)
    assert trained.model.scorer.flows.neighbourhood == 3 and older.model.scorer.flows.neighbourhood == 1
    images = list(small_bottle.test)[:2]
    assert not np.allclose(older.predict(images, progress=False).maps, trained.predict(images, progress=False).maps)


def test_bad_options_are_clear_errors() -> None:
    with pytest.raises(ConfigError, match="input_size"):
        defectflow.create("cflow", input_size=100)
    with pytest.raises(ConfigError, match="no_such_option"):
        defectflow.create("cflow", no_such_option=1)
    with pytest.raises(ConfigError, match="Unknown method"):
        defectflow.create("patchcore")
    with pytest.raises(ConfigError, match="not trained"):
        defectflow.create("cflow").predict(["x.png"])
