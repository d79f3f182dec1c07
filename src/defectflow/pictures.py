"""Pictures of one evaluation: a panel per test image, sorted by outcome, and per-category curves.

Panel columns: input | ground truth | each head's map | fused map | overlay | prediction (the
fused map at the pixel threshold). Files go to <out>/<TP|FP|TN|FN>/<type>_<stem>.png, where
the outcome is the image decision at the operating threshold against the label; without
thresholds they go to <out>/good or <out>/defective.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .data.images import load_image
from .files import save_png
from .metrics import pro_curve

OUTCOMES = ("FP", "FN", "TP", "TN")  # errors first: what people look at
FOLDERS = (*OUTCOMES, "defective", "good")  # the last two: by label, when there are no thresholds
CURVES = ("histogram", "roc", "pr", "pro")


@dataclass(frozen=True)
class Picture:
    path: Path
    outcome: str
    caption: str


def colour(values: np.ndarray, vmax: float) -> np.ndarray:
    """A map in [0, vmax] as HxWx3 colours in [0, 1] (matplotlib's 'jet')."""
    from matplotlib import colormaps

    return colormaps["jet"](np.clip(values / max(vmax, 1e-12), 0.0, 1.0))[..., :3]


def overlay(image: np.ndarray, anomaly_map: np.ndarray, vmax: float, alpha: float = 0.5) -> np.ndarray:
    """Heatmap over the image (HxWx3 in [0, 1])."""
    return ((1 - alpha) * image + alpha * colour(anomaly_map, vmax)).clip(0, 1)


def display_max(maps: np.ndarray, threshold: float | None = None) -> float:
    """One colour scale for a head over all images of a category, so colours compare across images:
    its 99.9th percentile, and at least twice the threshold so that 'below threshold' looks calm."""
    top = float(np.quantile(maps[:, ::4, ::4], 0.999))
    return max(top, 2 * threshold) if threshold is not None else top


def _grey(mask: np.ndarray) -> np.ndarray:
    return np.repeat(mask.astype(np.float64)[..., None], 3, axis=2)


def labelled_row(tiles: list[tuple[str, np.ndarray]]) -> np.ndarray:
    """Tiles side by side with a title strip above each (white text on black)."""
    height = 16
    columns = []
    for title, tile in tiles:
        strip = Image.new("RGB", (tile.shape[1], height))
        ImageDraw.Draw(strip).text((3, 2), title, fill=(255, 255, 255))
        columns.append(np.concatenate([np.asarray(strip, dtype=np.float64) / 255.0, tile], axis=0))
    return np.concatenate(columns, axis=1)


def outcome(label: int, defective: bool | None) -> str:
    if defective is None:
        return "defective" if label else "good"
    return ("TP" if defective else "FN") if label else ("FP" if defective else "TN")


def write_image_pictures(out_dir: str | Path, evaluation, input_size: tuple[int, int]) -> list[Picture]:
    """One panel PNG per test image of an Evaluation, in outcome folders."""
    out_dir = Path(out_dir)
    prediction = evaluation.prediction
    thresholds = prediction.thresholds
    pixel_threshold = None if thresholds is None else thresholds.pixel
    scales = {name: display_max(maps) for name, maps in prediction.head_maps.items()}
    fused_scale = display_max(prediction.maps, pixel_threshold)
    defective, regions = prediction.defective, prediction.regions
    pictures = []
    for index, path in enumerate(prediction.paths):
        path = Path(path)
        image = load_image(path, input_size).permute(1, 2, 0).numpy().astype(np.float64)
        fused = prediction.maps[index]
        tiles = [("input", image)]
        if evaluation.masks is not None:
            tiles.append(("ground truth", _grey(evaluation.masks[index])))
        tiles += [(name, colour(maps[index], scales[name])) for name, maps in prediction.head_maps.items()]
        tiles += [("fused" if prediction.head_maps else "anomaly map", colour(fused, fused_scale)), ("overlay", overlay(image, fused, fused_scale))]
        if regions is not None:
            tiles.append(("prediction", _grey(regions[index])))
        result = outcome(int(evaluation.labels[index]), None if defective is None else bool(defective[index]))
        target = out_dir / result / f"{path.parent.name}_{path.stem}.png"
        save_png(target, labelled_row(tiles))
        pictures.append(Picture(target, result, f"{path.parent.name}/{path.name}: score {prediction.scores[index]:.3f}"))
    return pictures


def write_curves(out_dir: str | Path, evaluation) -> dict[str, Path]:
    """Score histogram (good vs defective, with the threshold), ROC, PR and PRO curves as PNGs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import precision_recall_curve, roc_curve

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    labels, scores = evaluation.labels.astype(bool), evaluation.prediction.scores
    thresholds = evaluation.prediction.thresholds
    masks, maps = evaluation.masks, evaluation.prediction.maps
    paths: dict[str, Path] = {}

    def save(name: str, figure) -> None:
        figure.tight_layout()
        figure.savefig(out_dir / f"{name}.png", dpi=80)
        plt.close(figure)
        paths[name] = out_dir / f"{name}.png"

    figure, axis = plt.subplots(figsize=(5, 3.2))
    bins = np.linspace(scores.min(), scores.max(), 30)
    axis.hist(scores[~labels], bins=bins, alpha=0.6, label="good")
    axis.hist(scores[labels], bins=bins, alpha=0.6, label="defective")
    if thresholds is not None:
        axis.axvline(thresholds.image, color="k", linestyle="--", label=f"threshold ({thresholds.rule})")
    axis.set(xlabel="image score", ylabel="images", title="Image scores")
    axis.legend()
    save("histogram", figure)

    both = labels.any() and not labels.all()
    pixels = masks is not None and masks.any() and not masks.all()
    # (truth, scores) per level; pixels subsampled 2x2: the curves look the same, 4x faster
    levels = {"image": (labels, scores)} if both else {}
    if pixels:
        levels["pixel"] = (masks[:, ::2, ::2].ravel(), maps[:, ::2, ::2].ravel())
    if levels:
        figure, axis = plt.subplots(figsize=(4, 3.6))
        for name, (truth, values) in levels.items():
            fpr, tpr, _ = roc_curve(truth, values)
            axis.plot(fpr, tpr, label=name)
        axis.plot([0, 1], [0, 1], color="grey", linewidth=0.5)
        axis.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC")
        axis.legend()
        save("roc", figure)

        figure, axis = plt.subplots(figsize=(4, 3.6))
        for name, (truth, values) in levels.items():
            precision, recall, _ = precision_recall_curve(truth, values)
            axis.plot(recall, precision, label=name)
        axis.set(xlabel="recall", ylabel="precision", title="Precision-recall")
        axis.legend()
        save("pr", figure)

    if pixels:
        fpr, pro = pro_curve(masks, maps)
        keep = fpr <= 1.0
        step = max(1, keep.sum() // 2000)
        figure, axis = plt.subplots(figsize=(4, 3.6))
        axis.plot(fpr[keep][::step], pro[keep][::step])
        axis.axvline(0.3, color="grey", linestyle="--", label="AUPRO limit (FPR 0.3)")
        axis.set(xlabel="false positive rate", ylabel="per-region overlap", title="PRO", xlim=(0, 1), ylim=(0, 1.02))
        axis.legend()
        save("pro", figure)
    return paths
