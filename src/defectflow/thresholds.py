"""Operating thresholds: where a score or a map value becomes a DEFECT decision.

They are chosen at training time from data the model may see: the synthetic validation set
built from held-out good training images (its clean half and its synthetic defects). Two rules:

- ``far`` (default): a target false-alarm rate on good data: the (1 - far) quantile of the clean
  validation images' scores, and of the validation pixels outside any defect.
- ``f1``: the threshold with the best F1 on the validation set (clean vs synthetic defects for
  images, defect vs background pixels for the map). Synthetic defects are often plainer than
  real ones, so this threshold tends to sit high: on MVTec bottle (CFlow-AD) it passed 12 to 58
  of the 63 real defects as OK, with no false alarm.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from sklearn.metrics import precision_recall_curve

from .errors import CheckpointError

RULES = ("f1", "far")


@dataclass(frozen=True)
class Thresholds:
    image: float
    pixel: float
    rule: str
    target_far: float | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Thresholds":
        try:
            return cls(float(data["image"]), float(data["pixel"]), str(data["rule"]), data.get("target_far"))
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"The checkpoint's thresholds are malformed ({exc!r}): {data}") from None


def best_f1_threshold(labels: np.ndarray, scores: np.ndarray) -> float:
    """The score at and above which calling 'defect' gives the best F1 (labels 1 = defect)."""
    labels = np.asarray(labels).ravel().astype(bool)
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if labels.all() or not labels.any():
        raise ValueError("best_f1_threshold needs both normal and defective examples")
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    f1 = 2 * precision[:-1] * recall[:-1] / np.maximum(precision[:-1] + recall[:-1], 1e-12)
    return float(thresholds[int(np.argmax(f1))])


def far_threshold(normal_scores: np.ndarray, target_far: float) -> float:
    """The smallest threshold that flags at most target_far of the normal scores (strictly above it)."""
    values = np.sort(np.asarray(normal_scores, dtype=np.float64).ravel())
    allowed = int(np.floor(target_far * len(values)))  # how many normal values may lie at or above it
    top = values[len(values) - 1 - allowed]
    return float(np.nextafter(top, np.inf))


def choose_thresholds(
    labels: np.ndarray, scores: np.ndarray, masks: np.ndarray, maps: np.ndarray, rule: str, target_far: float
) -> Thresholds:
    """Image and pixel thresholds from validation scores/maps (labels 1 = defect, masks 1 = defect pixel)."""
    labels, masks = np.asarray(labels).astype(bool), np.asarray(masks).astype(bool)
    if rule == "f1":
        return Thresholds(best_f1_threshold(labels, scores), best_f1_threshold(masks, maps), rule)
    if rule == "far":
        return Thresholds(far_threshold(scores[~labels], target_far), far_threshold(maps[~masks], target_far), rule, target_far)
    raise ValueError(f"Unknown threshold rule {rule!r}: choose one of {RULES}")
