"""Train-evaluate-report in one call: what `defectflow run` and `defectflow eval` do."""

from __future__ import annotations

import time
from pathlib import Path

from .data.folder import AnomalyFolder
from .errors import DataError
from .methods import Detector, Evaluation
from .report import format_table, write_heatmaps, write_results


def prepare_output(out: str | Path | None, name: str, overwrite: bool = False) -> Path:
    """A fresh output folder: runs/<name>-<time> by default; an existing non-empty one only with overwrite."""
    if out is None:
        out = Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise DataError(f"Output folder {out} is not empty; choose another --out or pass --overwrite.")
    out.mkdir(parents=True, exist_ok=True)
    return out


def report_evaluation(
    detector: Detector, evaluation: Evaluation, out: Path, heatmaps: bool = True, train_seconds: float | None = None
) -> str:
    """Write results.json/csv (and heatmaps) for one category; return the printed table."""
    extra = {
        "head_results": {f"{evaluation.category} [{head}]": m for head, m in evaluation.head_metrics.items()},
        "method": detector.method,
        "config": detector.config.to_json(),
        "ms_per_image": evaluation.ms_per_image,
        "train_seconds": train_seconds,
        "images": {str(p): float(s) for p, s in zip(evaluation.prediction.paths, evaluation.prediction.scores)},
    }
    write_results(out, {evaluation.category: evaluation.metrics}, extra)
    if heatmaps:
        names = [f"{Path(p).parent.name}/{Path(p).stem}" for p in evaluation.prediction.paths]
        write_heatmaps(out / "heatmaps", evaluation.prediction, detector.config.input_size, names)
    rows = [(evaluation.category, evaluation.metrics, train_seconds, evaluation.ms_per_image)]
    rows += [(f"{evaluation.category} [{head} alone]", m, None, None) for head, m in evaluation.head_metrics.items()]
    return format_table(rows, time_columns=True)


def train_and_evaluate(detector: Detector, folder: AnomalyFolder, out: Path, progress: bool = True) -> tuple[Evaluation, str]:
    start = time.perf_counter()
    detector.fit(folder, progress=progress)
    train_seconds = time.perf_counter() - start
    if detector.validation is not None:
        detector.validation.save(out / "validation")
    evaluation = detector.evaluate(folder, progress=progress)
    table = report_evaluation(detector, evaluation, out, train_seconds=train_seconds)
    return evaluation, table
