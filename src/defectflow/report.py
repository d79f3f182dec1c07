"""Results as people read them: the papers' table, JSON and CSV files, heatmap overlays, decisions."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from .files import atomic_open, atomic_write_text, save_png
from .metrics import METRIC_NAMES, METRIC_TITLES

NOT_AVAILABLE = "n/a"


def _percent(value: float | None) -> str:
    return NOT_AVAILABLE if value is None else f"{100.0 * value:.2f}"


TIME_TITLES = ("Train s", "ms/img")


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines)


def table_cells(
    rows: Iterable[tuple[str, dict[str, float | None], float | None, float | None]], time_columns: bool = False
) -> tuple[list[str], list[list[str]]]:
    """Header and cells in the papers' column order; rows are (name, metrics, train s, ms/image)."""
    header = ["", *(METRIC_TITLES[m] for m in METRIC_NAMES), *(TIME_TITLES if time_columns else ())]
    cells = []
    for name, metrics, seconds, ms in rows:
        row = [name, *(_percent(metrics.get(m)) for m in METRIC_NAMES)]
        if time_columns:
            row += [NOT_AVAILABLE if seconds is None else f"{seconds:.1f}", NOT_AVAILABLE if ms is None else f"{ms:.1f}"]
        cells.append(row)
    return header, cells


def format_table(
    rows: Iterable[tuple[str, dict[str, float | None], float | None, float | None]], time_columns: bool = False
) -> str:
    """The papers' table in Markdown."""
    return markdown_table(*table_cells(rows, time_columns))


def mean_row(results: Sequence[dict[str, float | None]]) -> dict[str, float | None]:
    """Average of each metric over categories that have it (None when none has)."""
    mean: dict[str, float | None] = {}
    for name in METRIC_NAMES:
        values = [r[name] for r in results if r.get(name) is not None]
        mean[name] = float(np.mean(values)) if values else None
    return mean


def write_results(out_dir: str | Path, results: dict[str, dict[str, float | None]], extra: dict | None = None) -> tuple[Path, Path]:
    """results.json and results.csv, one row per category plus the mean."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = dict(results)
    if len(results) > 1:
        table["mean"] = mean_row(list(results.values()))
    json_path, csv_path = out_dir / "results.json", out_dir / "results.csv"
    atomic_write_text(json_path, json.dumps({"results": table, **(extra or {})}, indent=2))
    with atomic_open(csv_path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["category", *METRIC_NAMES])
        for category, metrics in table.items():
            writer.writerow([category, *("" if metrics.get(m) is None else f"{metrics[m]:.6f}" for m in METRIC_NAMES)])
    return json_path, csv_path


def write_heatmaps(out_dir: str | Path, prediction, input_size: tuple[int, int], names: Sequence[str] | None = None) -> Path:
    """One PNG per image (input | heatmap overlay) below out_dir, keeping the input's sub-folder.

    Maps are calibrated (1 = the most anomalous pixel of normal training images); the colour scale
    runs to twice the pixel threshold, or to 2 without one.
    """
    from .data.images import load_image
    from .pictures import overlay

    vmax = 2.0 if prediction.thresholds is None else 2.0 * prediction.thresholds.pixel
    out_dir = Path(out_dir)
    for index, (path, anomaly_map) in enumerate(zip(prediction.paths, prediction.maps)):
        image = load_image(path, input_size).permute(1, 2, 0).numpy()
        name = names[index] if names is not None else Path(path).stem
        save_png(out_dir / f"{name}.png", np.concatenate([image, overlay(image, anomaly_map, vmax)], axis=1))
    return out_dir


def write_predictions(out_dir: str | Path, prediction, names: Sequence[str]) -> Path:
    """scores.csv (path, score, decision, frame: the guard's failed checks, error: images that
    could not be read have only their error) and, with thresholds, one defect-region mask per
    image at the image's own resolution (regions/<name>.png, white = defect)."""
    from PIL import Image

    from .data.images import image_size

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    verdicts, regions = prediction.verdicts, prediction.regions
    with atomic_open(out_dir / "scores.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "score", "decision", "frame", "error"])
        for index, (path, score, reason) in enumerate(zip(prediction.paths, prediction.scores, prediction.frame_reasons)):
            writer.writerow([str(path), f"{score:.6f}", "" if verdicts is None else verdicts[index], reason, ""])
        for path, error in prediction.failed.items():
            writer.writerow([str(path), "", "", "", error])
    if regions is not None:
        (out_dir / "regions").mkdir(exist_ok=True)
        for path, name, region in zip(prediction.paths, names, regions):
            mask = Image.fromarray(region.astype(np.uint8) * 255).resize(image_size(path), Image.NEAREST)
            mask.save(out_dir / "regions" / f"{name}.png")
    return out_dir / "scores.csv"


def save_synthetic_grid(path: str | Path, samples: Sequence) -> Path:
    """Synthetic samples side by side: defective images on top, their training targets below."""
    path = Path(path)
    top = np.concatenate([s.image.permute(1, 2, 0).numpy() for s in samples], axis=1)
    bottom = np.concatenate([np.repeat(s.target[0].numpy()[..., None], 3, axis=2) for s in samples], axis=1)
    save_png(path, np.concatenate([top, bottom], axis=0))
    return path
