"""Train-evaluate-report in one call: what `defectflow run`, `eval` and `bench` do per category."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Sequence

from .data.folder import AnomalyFolder
from .files import containing, unwritable_reason
from .errors import DataError
from .htmlreport import evaluation_section, table, write_html
from .methods import Detector, Evaluation
from .pictures import CURVES, FOLDERS, OUTCOMES, Picture, outcome, write_curves, write_image_pictures
from .report import markdown_table, table_cells, write_results
from .thresholds import Thresholds


# what run, eval and predict write into an output folder; --overwrite replaces all of it at once
OUTPUTS = ("model", "validation", "pictures", "curves", "heatmaps", "regions", "results.json", "results.csv",
           "report.html", "scores.csv", "summary.md", "summary.csv", "summary.json")
# written into every output folder: its OUTPUTS entries are defectflow's, so --overwrite may remove them
OWNER_FILE = ".defectflow-output"


def prepare_output(out: str | Path | None, name: str, overwrite: bool = False, reads: Sequence[str | Path] = (),
                   not_inside: Sequence[str | Path] = ()) -> Path:
    """A fresh output folder: runs/<name>-<time> by default; an existing non-empty one only with
    overwrite. Checked before any long work. Overwriting an earlier output of defectflow removes
    all of what it wrote first (OUTPUTS; other files stay), so results, pictures and model never
    mix two runs. Refused instead, so that nothing the user made is lost: entries named like
    outputs in a folder defectflow did not write (no OWNER_FILE: the user's, or an output of a
    version before it), outputs that hold something this command `reads` (its checkpoint, data or
    images), and an --out inside a folder of `not_inside` (the data's scanned folders, where an
    output would become data; the checkpoint)."""
    if out is None:
        out = Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} is a file; choose a folder path for the output.")
    container = containing(out, not_inside)
    if container is not None:
        raise DataError(f"--out {out} lies inside {container}, which this command reads; choose an --out outside it.")
    reason = unwritable_reason(out)
    if reason is not None:
        raise DataError(f"Cannot write to --out {out}: {reason}. Choose another --out.")
    if out.is_dir() and any(entry.name != OWNER_FILE for entry in out.iterdir()):  # a failed run's folder is empty
        if not overwrite:
            raise DataError(f"Output folder {out} is not empty; choose another --out or pass --overwrite.")
        present = [out / entry for entry in OUTPUTS if (out / entry).exists() or (out / entry).is_symlink()]
        if present and not (out / OWNER_FILE).is_file():
            raise DataError(f"--out {out} holds {', '.join(p.name for p in present)}, which defectflow did not record "
                            f"writing there (no {OWNER_FILE}); --overwrite replaces only its own outputs. Move them "
                            "or choose another --out.")
        for path in reads:
            held = containing(path, present)
            if held is not None:
                raise DataError(f"--out {out} holds {path}, which this command reads: --overwrite would delete {held}. "
                                "Choose another --out.")
        for target in present:
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            else:
                target.unlink()
    out.mkdir(parents=True, exist_ok=True)
    (out / OWNER_FILE).write_text(f"defectflow wrote its outputs here ({', '.join(OUTPUTS)}); `--overwrite` removes "
                                  "those, and only those.\n")
    return out


def decision_counts(evaluation: Evaluation) -> dict[str, int] | None:
    """TP/FP/FN/TN of the image decisions at the operating threshold (None without thresholds)."""
    defective = evaluation.prediction.defective
    if defective is None:
        return None
    found = [outcome(int(label), bool(d)) for label, d in zip(evaluation.labels, defective)]
    return {name: found.count(name) for name in OUTCOMES}


def counts_text(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in counts.items())


def pixel_protocol(detector: Detector) -> str:
    """How the pixel metrics were measured, so figures are compared only with like figures."""
    height, width = detector.image_size
    how = {"cover": "every pixel a defect touches (no region lost)", "nearest": "nearest neighbour (the papers' protocol)"}
    return f"maps and ground truth at {height} x {width} (height x width); masks resized by {how[detector.config.mask_resampling]}"


def report_evaluation(
    detector: Detector,
    evaluation: Evaluation,
    out: Path,
    pictures: bool = True,
    train_seconds: float | None = None,
    html: bool = True,
) -> str:
    """results.json/csv for one category, and with pictures: per-image panels (pictures/),
    curves (curves/) and, with html, a self-contained report.html. Returns the printed table."""
    counts = decision_counts(evaluation)
    thresholds = evaluation.prediction.thresholds
    extra = {
        "head_results": {f"{evaluation.category} [{head}]": m for head, m in evaluation.head_metrics.items()},
        "method": detector.method,
        "config": detector.config.to_json(),
        "ms_per_image": evaluation.ms_per_image,
        "train_seconds": train_seconds,
        "thresholds": None if thresholds is None else thresholds.to_json(),
        "pixel_protocol": pixel_protocol(detector) if evaluation.masks is not None else None,
        "decisions": counts,
        "images": {str(p): float(s) for p, s in zip(evaluation.prediction.paths, evaluation.prediction.scores)},
        "failed_images": {str(p): reason for p, reason in evaluation.prediction.failed.items()},
    }
    write_results(out, {evaluation.category: evaluation.metrics}, extra)
    rows = [(evaluation.category, evaluation.metrics, train_seconds, evaluation.ms_per_image)]
    rows += [(f"{evaluation.category} [{head} alone]", m, None, None) for head, m in evaluation.head_metrics.items()]
    header, cells = table_cells(rows, time_columns=True)
    text = markdown_table(header, cells)
    if evaluation.masks is not None:
        text += f"\nPixel metrics: {pixel_protocol(detector)}"
    position = getattr(detector.config, "position_reference", None)
    if position is not None:  # cflow, clscnf (auto is settled at fit)
        where = "above each place's normal level" if position == "on" else "of the map itself"
        text += f"\nImage score: {where} (position_reference {position})"
    if counts is not None:
        text += f"\nAt the operating threshold ({thresholds.rule}): " + counts_text(counts)
        if thresholds.note is not None:
            text += f"\nNote: {thresholds.note}"
    if pictures:
        write_image_pictures(out / "pictures", evaluation, detector.image_size)
        write_curves(out / "curves", evaluation)
        if html:
            section = folder_section(out, f"{detector.method} on {evaluation.category}")
            write_html(out / "report.html", f"defectflow {detector.method}: {evaluation.category}", [table(header, cells), section])
    return text


def folder_section(run_dir: Path, heading: str) -> str:
    """The HTML section of one evaluation folder (results.json, curves/, pictures/) as written by
    report_evaluation, so a resumed bench can show runs finished in an earlier invocation."""
    results = json.loads((run_dir / "results.json").read_text())
    scores = {f"{Path(p).parent.name}_{Path(p).stem}": s for p, s in results.get("images", {}).items()}
    pictures = [
        Picture(path, path.parent.name, f"{path.stem}: score {scores.get(path.stem, float('nan')):.3f}")
        for group in FOLDERS
        for path in sorted((run_dir / "pictures" / group).glob("*.png"))
    ]
    curves = {name: run_dir / "curves" / f"{name}.png" for name in CURVES if (run_dir / "curves" / f"{name}.png").is_file()}
    note = ""
    if results.get("thresholds"):
        t = results["thresholds"]
        note = f"Image threshold {t['image']:.4f}, pixel threshold {t['pixel']:.4f} ({t['rule']})"
        if results.get("decisions"):
            note += "; " + counts_text(results["decisions"])
        extrapolated = Thresholds.from_json(t).note
        if extrapolated is not None:
            note += f". Note: {extrapolated}"
    return evaluation_section(heading, curves, pictures, note)


def train_and_evaluate(
    detector: Detector, folder: AnomalyFolder, out: Path, progress: bool = True, pictures: bool = True, html: bool = True,
    keep_validation: bool = True,
) -> tuple[Evaluation, str, float]:
    """Fit, save the model to out/model, evaluate and report; returns (evaluation, table, training seconds).

    The test split and its masks are checked (file headers) before training, and the model is
    saved as soon as it is trained, so a failure in evaluation or reporting never costs the training.
    """
    if folder.test:
        folder.check_test_split()
    start = time.perf_counter()
    detector.fit(folder, progress=progress)
    train_seconds = time.perf_counter() - start
    detector.save(out / "model")
    if detector.validation is not None and keep_validation:
        detector.validation.save(out / "validation")
    evaluation = detector.evaluate(folder, progress=progress)
    table_text = report_evaluation(detector, evaluation, out, pictures=pictures, train_seconds=train_seconds, html=html)
    return evaluation, table_text, train_seconds
