"""Image AUROC, pixel AUROC, pixel AUPR (average precision) and AUPRO, as the papers report them."""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from sklearn.metrics import average_precision_score, roc_auc_score

METRIC_NAMES = ("image_auroc", "pixel_auroc", "pixel_aupr", "aupro")
METRIC_TITLES = {"image_auroc": "Img AUROC", "pixel_auroc": "Pix AUROC", "pixel_aupr": "Pix AUPR", "aupro": "AUPRO"}


def _both_classes(labels: np.ndarray) -> bool:
    return labels.min() != labels.max()


def image_auroc(labels: np.ndarray, scores: np.ndarray) -> float | None:
    labels = np.asarray(labels).astype(int)
    return float(roc_auc_score(labels, scores)) if _both_classes(labels) else None


def pixel_auroc(masks: np.ndarray, maps: np.ndarray) -> float | None:
    truth = np.asarray(masks).ravel() > 0
    return float(roc_auc_score(truth, np.asarray(maps).ravel())) if _both_classes(truth) else None


def pixel_aupr(masks: np.ndarray, maps: np.ndarray) -> float | None:
    truth = np.asarray(masks).ravel() > 0
    return float(average_precision_score(truth, np.asarray(maps).ravel())) if _both_classes(truth) else None


def pro_curve(masks: np.ndarray, maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False-positive rate and per-region overlap at every distinct threshold (decreasing).

    Each connected component of the ground truth (8-connectivity, per image) is one region; PRO
    at a threshold is the mean over regions of the share of the region above the threshold. FPR is
    the share of all normal pixels above it. Exact: one sort of all pixels, no threshold grid.
    """
    masks = np.asarray(masks) > 0
    maps = np.asarray(maps, dtype=np.float64)
    weights = np.zeros(masks.shape, dtype=np.float64)
    structure = np.ones((3, 3), dtype=int)
    n_regions = 0
    for index in range(masks.shape[0]):
        labelled, count = ndimage.label(masks[index], structure=structure)
        if count:
            sizes = np.bincount(labelled.ravel())
            region_weight = np.where(labelled > 0, 1.0 / sizes[labelled], 0.0)
            weights[index] = region_weight
            n_regions += count
    normal = ~masks.ravel()
    if n_regions == 0 or not normal.any():
        raise ValueError("PRO needs at least one defect region and one normal pixel")
    order = np.argsort(-maps.ravel(), kind="stable")
    scores = maps.ravel()[order]
    fpr = np.cumsum(normal[order]) / normal.sum()
    pro = np.cumsum(weights.ravel()[order]) / n_regions
    last_of_tie = np.r_[scores[1:] != scores[:-1], True]
    return np.r_[0.0, fpr[last_of_tie]], np.r_[0.0, pro[last_of_tie]]


def aupro(masks: np.ndarray, maps: np.ndarray, fpr_limit: float = 0.3) -> float | None:
    """Area under the PRO curve up to fpr_limit, divided by fpr_limit (1.0 is perfect)."""
    masks = np.asarray(masks) > 0
    if not masks.any() or masks.all():
        return None
    fpr, pro = pro_curve(masks, maps)
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
        result.update(pixel_auroc=pixel_auroc(masks, maps), pixel_aupr=pixel_aupr(masks, maps), aupro=aupro(masks, maps))
    return result
