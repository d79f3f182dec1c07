import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from defectflow.metrics import aupro, compute_metrics, image_auroc, pixel_aupr, pixel_auroc, pro_curve


def test_image_auroc_hand_worked() -> None:
    # 3 of the 4 (defect, good) pairs are ordered correctly -> 0.75
    assert image_auroc(np.array([0, 0, 1, 1]), np.array([0.1, 0.6, 0.5, 0.9])) == pytest.approx(0.75)
    assert image_auroc(np.array([0, 0]), np.array([0.1, 0.2])) is None


@pytest.mark.parametrize("levels", [None, 7])  # continuous scores, and scores with many ties
def test_pixel_metrics_match_sklearn(levels: int | None) -> None:
    rng = np.random.default_rng(0)
    masks = rng.random((5, 24, 16)) > 0.8
    maps = rng.random((5, 24, 16)) + masks * 0.3
    if levels:
        maps = np.round(maps * levels) / levels
    assert pixel_auroc(masks, maps) == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), rel=1e-9)
    assert pixel_aupr(masks, maps) == pytest.approx(average_precision_score(masks.ravel(), maps.ravel()), rel=1e-9)
    together = compute_metrics(np.array([0, 0, 1, 1, 1]), maps.max(axis=(1, 2)), masks, maps)  # one shared ranking
    assert together["pixel_auroc"] == pixel_auroc(masks, maps) and together["pixel_aupr"] == pixel_aupr(masks, maps)
    assert together["aupro"] == aupro(masks, maps)


def _one_image_two_regions() -> tuple[np.ndarray, np.ndarray]:
    """Region A (2 px) scores high, region B (2 px) half high, 6 normal pixels score low."""
    masks = np.zeros((1, 1, 10), dtype=bool)
    masks[0, 0, [0, 1, 5, 6]] = True  # two separate regions: {0,1} and {5,6}
    maps = np.zeros((1, 1, 10))
    maps[0, 0, [0, 1]] = 0.9
    maps[0, 0, 5] = 0.8
    maps[0, 0, 6] = 0.05
    maps[0, 0, [2, 3, 4, 7, 8, 9]] = [0.3, 0.2, 0.1, 0.01, 0.02, 0.03]
    return masks, maps


def test_pro_curve_hand_worked() -> None:
    masks, maps = _one_image_two_regions()
    fpr, pro = pro_curve(masks, maps)
    # thresholds 0.9: A fully covered -> PRO (1 + 0)/2 = .5; 0.8: B half -> .75; 0.3: first FP
    assert pro[1] == pytest.approx(0.5) and fpr[1] == 0
    assert pro[2] == pytest.approx(0.75) and fpr[2] == 0
    assert fpr[3] == pytest.approx(1 / 6) and pro[3] == pytest.approx(0.75)
    assert fpr[-1] == pytest.approx(1.0) and pro[-1] == pytest.approx(1.0)


def test_aupro_hand_worked_and_normalised() -> None:
    masks, maps = _one_image_two_regions()
    # PRO is 0.75 from FPR 0 to 0.5 (B's second pixel comes at FPR 4/6 > 0.3) -> area 0.75*0.3
    assert aupro(masks, maps, fpr_limit=0.3) == pytest.approx(0.75)
    assert aupro(masks, masks.astype(float)) == pytest.approx(1.0)
    assert aupro(masks, -masks.astype(float)) == pytest.approx(0.0)


def test_aupro_regions_weigh_equally_whatever_their_size() -> None:
    masks = np.zeros((2, 10, 10), dtype=bool)
    masks[0, :5, :5] = True  # big region, found
    masks[1, 0, 0] = True  # tiny region, missed
    maps = np.zeros((2, 10, 10))
    maps[0, :5, :5] = 1.0
    maps[1, 0, 0] = -1.0
    # at every FPR <= 0.3 PRO is 0.5: the missed tiny region counts as much as the big one
    assert aupro(masks, maps) == pytest.approx(0.5)
    assert pixel_auroc(masks, maps) > 0.95


def test_aupro_is_invariant_to_monotone_rescaling() -> None:
    rng = np.random.default_rng(1)
    masks = np.zeros((4, 16, 16), dtype=bool)
    masks[1, 3:7, 3:9] = True
    masks[2, 10:14, 2:4] = True
    maps = rng.random(masks.shape) + masks * 0.5
    assert aupro(masks, maps) == pytest.approx(aupro(masks, np.exp(3 * maps) + 7))


def test_compute_metrics_without_masks_marks_pixel_metrics_unavailable() -> None:
    result = compute_metrics(np.array([0, 1]), np.array([0.2, 0.7]))
    assert result == {"image_auroc": 1.0, "pixel_auroc": None, "pixel_aupr": None, "aupro": None}
