"""Operating thresholds: the rules on hand-worked cases, and a detector that stores and uses them."""

from pathlib import Path

import numpy as np
import pytest

import defectflow
from defectflow.data.folder import AnomalyFolder
from defectflow.errors import ConfigError
from defectflow.thresholds import Thresholds, best_f1_threshold, choose_thresholds, far_threshold, gumbel_quantile, image_far_threshold

TINY = dict(input_size=128, meta_epochs=1, sub_epochs=2, fiber_batch=512, batch_size=8, val_fraction=0.25)


def test_best_f1_threshold_hand_worked() -> None:
    # thresholds 0.8 / 0.4 / 0.35 / 0.1 give F1 0.67 / 0.5 / 0.8 / 0.67
    assert best_f1_threshold(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8])) == pytest.approx(0.35)
    with pytest.raises(ValueError):
        best_f1_threshold(np.array([0, 0]), np.array([0.1, 0.2]))


def test_far_threshold_flags_at_most_the_target_share() -> None:
    normal = np.arange(1.0, 101.0)
    threshold = far_threshold(normal, 0.05)
    assert (normal >= threshold).sum() == 5 and threshold > 95.0
    assert (normal >= far_threshold(normal, 0.0)).sum() == 0
    assert far_threshold(normal, 0.0) == pytest.approx(100.0)


def test_far_rule_looks_at_normal_data_only() -> None:
    labels = np.array([0, 0, 1])
    masks = np.zeros((3, 2, 2))
    masks[2, 0, 0] = 1
    maps = np.zeros((3, 2, 2))
    maps[2, 0, 0] = 50.0  # a defect pixel, far above everything normal
    maps[1, 1, 1] = 0.5
    t = choose_thresholds(labels, np.array([0.2, 0.3, 9.0]), masks, maps, "far", 0.0)
    assert 0.3 < t.image < 0.31 and 0.5 < t.pixel < 0.51 and t.rule == "far"
    assert Thresholds.from_json(t.to_json()) == t


def test_gumbel_fit_recovers_the_quantile_of_a_gumbel_law() -> None:
    values = np.random.default_rng(0).gumbel(2.0, 0.5, size=20_000)
    true_q99 = 2.0 - 0.5 * np.log(-np.log(0.99))
    assert gumbel_quantile(values, 0.99) == pytest.approx(true_q99, abs=0.03)


def test_few_good_images_extrapolate_the_image_threshold_to_the_target_rate() -> None:
    """24 held-out scores cannot resolve 1%: above their maximum flags about 1 in 25 good parts.
    The extrapolated threshold must flag close to 1% of good parts of the same law."""
    rng = np.random.default_rng(1)
    far_of = lambda t: 1.0 - np.exp(-np.exp(-t))  # noqa: E731 - exceedance of the standard Gumbel law
    empirical, extrapolated = [], []
    for _ in range(400):
        scores = rng.gumbel(size=24)
        threshold, count = image_far_threshold(scores, 0.01)
        assert count == 24 and threshold >= far_threshold(scores, 0.01)
        empirical.append(far_of(far_threshold(scores, 0.01)))
        extrapolated.append(far_of(threshold))
    assert np.mean(empirical) > 0.03  # the old rule: about 1/25
    assert 0.005 < np.mean(extrapolated) < 0.02
    # enough images for the target (or a target of 0): the empirical rule, nothing extrapolated
    many = rng.gumbel(size=300)
    assert image_far_threshold(many, 0.01) == (far_threshold(many, 0.01), None)
    assert image_far_threshold(many[:24], 0.0) == (far_threshold(many[:24], 0.0), None)
    t = choose_thresholds(np.zeros(24, int), many[:24], np.zeros((24, 2, 2)), np.zeros((24, 2, 2)), "far", 0.01)
    assert t.extrapolated_from == 24 and "24 held-out good images" in t.note
    assert Thresholds.from_json(t.to_json()) == t
    old = {k: v for k, v in t.to_json().items() if k != "extrapolated_from"}  # a checkpoint from before
    assert Thresholds.from_json(old).extrapolated_from is None and Thresholds.from_json(old).note is None


@pytest.fixture(scope="module")
def trained(small_bottle: AnomalyFolder) -> defectflow.Detector:
    return defectflow.create("cflow", **TINY, threshold_rule="far", target_far=0.0).fit(small_bottle, progress=False)


def test_thresholds_come_from_held_out_images_and_survive_save_load(trained, small_bottle: AnomalyFolder, tmp_path: Path) -> None:
    held_out = {s.path for s in trained.validation.sources}
    assert len(held_out) == 4 and held_out <= {s.path for s in small_bottle.train}
    # far 0: no held-out image, taken before its synthetic defect, and none of its pixels is flagged
    clean = trained.predict_images(trained.validation.clean)
    assert len(clean.scores) == 4 and not clean.defective.any() and not clean.regions.any()
    with_defects = trained.predict_images(trained.validation.images)
    assert with_defects.defective[trained.validation.labels == 1].any()  # it is not that nothing is ever flagged

    loaded = defectflow.load(trained.save(tmp_path / "model"))
    assert loaded.thresholds == trained.thresholds
    prediction = loaded.predict(small_bottle, progress=False)
    over = prediction.scores.astype(np.float64) >= trained.thresholds.image
    np.testing.assert_array_equal(prediction.defective, over | prediction.invalid)
    np.testing.assert_array_equal(prediction.regions, prediction.maps.astype(np.float64) >= trained.thresholds.pixel)


def test_no_held_out_images_means_no_thresholds(small_bottle: AnomalyFolder) -> None:
    detector = defectflow.create("cflow", **{**TINY, "val_fraction": 0.0}).fit(small_bottle.train[:4], progress=False)
    assert detector.validation is None and detector.thresholds is None
    assert detector.predict(small_bottle.test[:1], progress=False).defective is None


def test_bad_threshold_options() -> None:
    with pytest.raises(ConfigError, match="threshold_rule"):
        defectflow.create("cflow", threshold_rule="youden")
    with pytest.raises(ConfigError, match="target_far"):
        defectflow.create("cflow", target_far=1.5)
