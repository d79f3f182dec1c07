"""Image AUROC, pixel AUROC, pixel AUPR (average precision) and AUPRO, as the papers report them."""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from sklearn.metrics import roc_auc_score

METRIC_NAMES = ("image_auroc", "pixel_auroc", "pixel_aupr", "aupro")
METRIC_TITLES = {"image_auroc": "Img AUROC", "pixel_auroc": "Pix AUROC", "pixel_aupr": "Pix AUPR", "aupro": "AUPRO"}


def _both_classes(labels: np.ndarray) -> bool:
    return labels.min() != labels.max()


def image_auroc(labels: np.ndarray, scores: np.ndarray) -> float | None:
    labels = np.asarray(labels).astype(int)
    return float(roc_auc_score(labels, scores)) if _both_classes(labels) else None


class PixelRanking:
    """Every pixel ranked by its score, once, for all the pixel metrics.

    scikit-learn's roc_auc_score and average_precision_score sort the pixels again for each
    metric: on 42 maps of 256 x 256 (clscnf's validation set, scored after every stage-1 epoch)
    the three pixel metrics took 2.1 s, two thirds of it in three sorts of the same scores. Here
    one sort serves the ROC, precision-recall and PRO curves, each taken at every distinct score
    (the last pixel of each run of ties, so the order within ties does not matter); the tests
    check the results against scikit-learn's.
    """

    def __init__(self, maps: np.ndarray) -> None:
        flat = np.asarray(maps).ravel()
        self.order = np.argsort(flat)[::-1]  # decreasing score
        ranked = flat[self.order]
        self.last_of_tie = np.r_[ranked[1:] != ranked[:-1], True]

    def cumulative(self, values: np.ndarray) -> np.ndarray:
        """Running sums of per-pixel values (flattened like the maps) over the pixels at or above each
        distinct score, from the highest; starts with 0 (nothing above the highest threshold)."""
        return np.r_[0.0, np.cumsum(np.asarray(values, dtype=np.float64).ravel()[self.order])[self.last_of_tie]]


def _roc(truth: np.ndarray, ranking: PixelRanking) -> tuple[np.ndarray, np.ndarray]:
    """True-positive and false-positive counts at every distinct threshold, decreasing."""
    return ranking.cumulative(truth), ranking.cumulative(~truth)


def pixel_auroc(masks: np.ndarray, maps: np.ndarray, ranking: PixelRanking | None = None) -> float | None:
    truth = np.asarray(masks).ravel() > 0
    if not _both_classes(truth):
        return None
    tps, fps = _roc(truth, ranking or PixelRanking(maps))
    return float(np.trapezoid(tps / tps[-1], fps / fps[-1]))


def pixel_aupr(masks: np.ndarray, maps: np.ndarray, ranking: PixelRanking | None = None) -> float | None:
    """Average precision as scikit-learn defines it: precision at each threshold weighted by the recall it adds."""
    truth = np.asarray(masks).ravel() > 0
    if not _both_classes(truth):
        return None
    tps, fps = _roc(truth, ranking or PixelRanking(maps))
    return float(np.sum(np.diff(tps / tps[-1]) * tps[1:] / (tps[1:] + fps[1:])))


def pro_curve(masks: np.ndarray, maps: np.ndarray, ranking: PixelRanking | None = None) -> tuple[np.ndarray, np.ndarray]:
    """False-positive rate and per-region overlap at every distinct threshold (decreasing).

    Each connected component of the ground truth (8-connectivity, per image) is one region; PRO
    at a threshold is the mean over regions of the share of the region above the threshold. FPR is
    the share of all normal pixels above it. Exact: one sort of all pixels, no threshold grid.
    """
    masks = np.asarray(masks) > 0
    weights = np.zeros(masks.shape, dtype=np.float64)
    structure = np.ones((3, 3), dtype=int)
    n_regions = 0
    for index in range(masks.shape[0]):
        labelled, count = ndimage.label(masks[index], structure=structure)
        if count:
            sizes = np.bincount(labelled.ravel())
            weights[index] = np.where(labelled > 0, 1.0 / sizes[labelled], 0.0)
            n_regions += count
    normal = ~masks.ravel()
    if n_regions == 0 or not normal.any():
        raise ValueError("PRO needs at least one defect region and one normal pixel")
    ranking = ranking or PixelRanking(maps)
    fps = ranking.cumulative(normal)
    return fps / fps[-1], ranking.cumulative(weights) / n_regions


def aupro(masks: np.ndarray, maps: np.ndarray, fpr_limit: float = 0.3, ranking: PixelRanking | None = None) -> float | None:
    """Area under the PRO curve up to fpr_limit, divided by fpr_limit (1.0 is perfect)."""
    masks = np.asarray(masks) > 0
    if not masks.any() or masks.all():
        return None
    fpr, pro = pro_curve(masks, maps, ranking)
    end = np.searchsorted(fpr, fpr_limit, side="right")
    if end < len(fpr):  # interpolate the curve's value exactly at fpr_limit
        x0, x1, y0, y1 = fpr[end - 1], fpr[end], pro[end - 1], pro[end]
        pro_at_limit = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0) if x1 > x0 else y1
        fpr = np.r_[fpr[:end], fpr_limit]
        pro = np.r_[pro[:end], pro_at_limit]
    return float(np.trapezoid(pro, fpr) / fpr_limit)


def compute_metrics(
    labels: np.ndarray, scores: np.ndarray, masks: np.ndarray | None = None, maps: np.ndarray | None = None
) -> dict[str, float | None]:
    """The four metrics; pixel metrics are None without masks (image-level datasets)."""
    result: dict[str, float | None] = {"image_auroc": image_auroc(labels, scores)}
    if masks is None or maps is None:
        result.update(pixel_auroc=None, pixel_aupr=None, aupro=None)
    else:
        ranking = PixelRanking(maps)
        result.update(pixel_auroc=pixel_auroc(masks, maps, ranking), pixel_aupr=pixel_aupr(masks, maps, ranking),
                      aupro=aupro(masks, maps, ranking=ranking))
    return result
