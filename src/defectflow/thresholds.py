"""Operating thresholds: where a score or a map value becomes a DEFECT decision.

They are chosen at training time from data the model may see: the synthetic validation set
built from held-out good training images (its clean half and its synthetic defects). Two rules:

- ``far`` (default): a target false-alarm rate on good data: the (1 - far) quantile of the clean
  validation images' scores, and of the validation pixels outside any defect. With fewer good
  images than 1 / far (fewer than 100 for 1%) no empirical quantile resolves the target: the
  largest held-out score is about the 1 - 1/(n + 1) quantile (on the elpv task 20 held-out
  cells gave 6-7 false alarms of 60, not 1%). There the image threshold is the (1 - far)
  quantile of a Gumbel law fitted to the held-out scores, if that is higher: an image score is
  the maximum of a map over many pixels, and maxima of many values follow an extreme-value law
  (Fisher-Tippett-Gnedenko; Gumbel for tails that fall off exponentially or faster).
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
    extrapolated_from: int | None = None  # the good images a Gumbel fit extrapolated the image threshold from

    @property
    def note(self) -> str | None:
        """What the user should know about how the image threshold was set, if anything."""
        if self.extrapolated_from is None:
            return None
        return (f"The {100 * self.target_far:g}% false-alarm image threshold was extrapolated from only {self.extrapolated_from} "
                f"held-out good images (a Gumbel fit of their scores; an empirical one needs {int(np.ceil(1 / self.target_far))}): "
                "its false-alarm rate is an estimate. Hold out more good images (--val-fraction) or add good training images.")

    @property
    def finite(self) -> bool:
        """Whether both thresholds are numbers: every score compares false with NaN (all frames OK)."""
        return bool(np.isfinite([self.image, self.pixel]).all())

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Thresholds":
        try:
            extrapolated = data.get("extrapolated_from")
            thresholds = cls(float(data["image"]), float(data["pixel"]), str(data["rule"]), data.get("target_far"),
                             None if extrapolated is None else int(extrapolated))
            if not thresholds.finite:
                raise ValueError("thresholds must be finite numbers")
            return thresholds
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


def gumbel_quantile(values: np.ndarray, quantile: float) -> float:
    """The quantile of a Gumbel law fitted to the values by its mean and standard deviation
    (moments: steadier than maximum likelihood on a few dozen values)."""
    values = np.asarray(values, dtype=np.float64).ravel()
    scale = np.std(values, ddof=1) * np.sqrt(6.0) / np.pi
    location = np.mean(values) - np.euler_gamma * scale
    return float(location - scale * np.log(-np.log(quantile)))


def image_far_threshold(normal_scores: np.ndarray, target_far: float) -> tuple[float, int | None]:
    """far_threshold of the image scores, raised to a Gumbel fit's (1 - target_far) quantile when
    there are too few of them to resolve target_far; the count in that case, else None."""
    normal_scores = np.asarray(normal_scores, dtype=np.float64).ravel()
    threshold = far_threshold(normal_scores, target_far)
    if target_far <= 0 or len(normal_scores) * target_far >= 1 or len(normal_scores) < 2:
        return threshold, None
    return max(threshold, gumbel_quantile(normal_scores, 1.0 - target_far)), len(normal_scores)


def choose_thresholds(
    labels: np.ndarray, scores: np.ndarray, masks: np.ndarray, maps: np.ndarray, rule: str, target_far: float
) -> Thresholds:
    """Image and pixel thresholds from validation scores/maps (labels 1 = defect, masks 1 = defect pixel)."""
    labels, masks = np.asarray(labels).astype(bool), np.asarray(masks).astype(bool)
    if rule == "f1":
        return Thresholds(best_f1_threshold(labels, scores), best_f1_threshold(masks, maps), rule)
    if rule == "far":
        image, extrapolated_from = image_far_threshold(scores[~labels], target_far)
        return Thresholds(image, far_threshold(maps[~masks], target_far), rule, target_far, extrapolated_from)
    raise ValueError(f"Unknown threshold rule {rule!r}: choose one of {RULES}")
