"""Benchmark: inference speed and metrics of every backend on MVTec AD bottle's test set.

    HF_HOME=../shared/hf-home HF_HUB_OFFLINE=1 python benchmarks/speed_bottle.py --threads 2

Trains cflow and clscnf (256 x 256, the tool's defaults; clscnf with defects on the object, as
benchmarks/bench_bottle.json) into --out, each in a process of its own set up as `defectflow
train` is, or reuses the models an earlier run left there, and prints each stage's training
seconds. Then, in another fresh process per method, exports each model to ONNX and OpenVINO INT8
(calibrated on its training and synthetic validation images) and predicts all test images with
PyTorch, ONNX Runtime, OpenVINO fp32 and OpenVINO INT8 at batch 1 and 8, printing ms/image,
images/s, the four metrics and the largest differences from PyTorch.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import time
from pathlib import Path

import numpy as np
import torch

import defectflow
from defectflow import CheckpointError, Prediction
from defectflow.backends import ONNX_FILE, int8_path, meta_path
from defectflow.data.folder import AnomalyFolder, load_images, load_sample_mask
from defectflow.export import export_int8, export_onnx
from defectflow.metrics import METRIC_NAMES, METRIC_TITLES, compute_metrics
from defectflow.report import markdown_table

OPTIONS = {"cflow": {}, "clscnf": {"foreground": True}}
TRAIN_RECORD = "train_seconds.json"


def train(method: str, data: str, out: Path, threads: int) -> None:
    """Trains and saves one model with its seconds per stage. Runs in a process of its own with
    freed memory kept, as `defectflow train` runs (memory.py; the benchmark's process leaves it off,
    the exported runtimes ran slower with it): clscnf's stage 1 took 236.7 s in the benchmark's
    process after cflow's training, 199 s in a process set up as the CLI's (2026-11-27)."""
    torch.set_num_threads(threads)
    defectflow.keep_freed_memory()
    folder = AnomalyFolder.scan(data)
    detector = defectflow.create(method, **OPTIONS[method])
    start = time.perf_counter()
    detector.fit(folder)
    total = time.perf_counter() - start
    detector.save(out / method / "model", overwrite=True)
    detector.validation.save(out / method / "validation")
    seconds = {**detector.fit_seconds, "other (validation set, guard, thresholds)": total - sum(detector.fit_seconds.values()),
               "total": total}
    (out / method / TRAIN_RECORD).write_text(json.dumps(seconds, indent=2))


def trained(method: str, folder: AnomalyFolder, out: Path, threads: int) -> tuple[Path, dict[str, float]]:
    """The checkpoint out/<method>/model and its training seconds per stage, trained here unless an earlier run left it."""
    record = out / method / TRAIN_RECORD
    if not record.is_file():
        worker = multiprocessing.get_context("spawn").Process(
            target=train, args=(method, str(folder.root), out, threads), daemon=True)
        worker.start()
        worker.join()
        if worker.exitcode:
            raise SystemExit(f"training {method} failed (exit status {worker.exitcode}); see the error above")
    return out / method / "model", json.loads(record.read_text())


def exported(checkpoint: Path, folder: AnomalyFolder) -> dict:
    """Exports the checkpoint (ONNX, then INT8) unless a current export is there; the INT8 check."""
    detector = defectflow.load(checkpoint, device="cpu")
    for backend, export in (("openvino", lambda: export_onnx(detector, checkpoint, overwrite=True)),
                            ("openvino-int8", lambda: export_int8(detector, checkpoint, folder))):
        try:
            defectflow.load(checkpoint, backend=backend)
        except CheckpointError:
            export()
    return json.loads(meta_path(int8_path(checkpoint / ONNX_FILE)).read_text())["check"]


def timed_predict(detector, images: torch.Tensor, batch_size: int) -> tuple[Prediction, float]:
    """The prediction of preloaded images and its ms/image: the model alone, no image decoding."""
    detector.config.batch_size = batch_size
    detector.predict_images(images[:batch_size])  # warm-up
    start = time.perf_counter()
    prediction = detector.predict_images(images)
    return prediction, 1000.0 * (time.perf_counter() - start) / len(images)


def bench(method: str, data: str, checkpoint: Path, threads: int) -> tuple[list[list[str]], dict]:
    """Exports one checkpoint and times it on every backend and batch size; the table's rows and the INT8 check."""
    torch.set_num_threads(threads)
    folder = AnomalyFolder.scan(data)
    check = exported(checkpoint, folder)
    rows: list[list[str]] = []
    reference = None
    for backend in ("torch", "onnx", "openvino", "openvino-int8"):
        detector = defectflow.load(checkpoint, device="cpu", backend=backend)
        if reference is None:
            images = load_images(folder.test, detector.image_size)
            labels = np.array([s.label for s in folder.test])
            masks = np.stack([load_sample_mask(s, detector.image_size, resampling=detector.config.mask_resampling)[0].numpy() > 0
                              for s in folder.test])
        for batch_size in (1, 8):
            prediction, ms = timed_predict(detector, images, batch_size)
            reference = reference or prediction
            metrics = compute_metrics(labels, prediction.scores, masks, prediction.maps)
            same = int((prediction.defective == reference.defective).sum())
            # predict from the files, decoding overlapped with inference (batch 8 only: it doubles the time)
            end_to_end = f"{1000 / detector.evaluate(folder, progress=False).ms_per_image:.1f}" if batch_size > 1 else ""
            rows.append([method, backend, str(batch_size), f"{ms:.1f}", f"{1000 / ms:.1f}", end_to_end,
                         *(f"{100 * metrics[m]:.2f}" for m in METRIC_NAMES),
                         f"{np.abs(prediction.maps - reference.maps).max():.1e}", f"{same}/{len(images)}"])
            print(" | ".join(rows[-1]), flush=True)
    return rows, check


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="../shared/data/mvtec/bottle")
    parser.add_argument("--out", type=Path, default=Path("runs/speed-bottle"), help="models are trained into (and reused from) here")
    parser.add_argument("--methods", nargs="+", default=list(OPTIONS), choices=list(OPTIONS))
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="CPU threads of every backend")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    folder = AnomalyFolder.scan(args.data)
    rows, training, checks = [], [], []
    for method in args.methods:
        checkpoint, seconds = trained(method, folder, args.out, args.threads)
        training.append(f"{method}: " + ", ".join(f"{stage} {s:.1f}" for stage, s in seconds.items()))
        # each method in a fresh process: after cflow's runtimes had run in this one, clscnf's PyTorch
        # batch 1 took 84.9 ms and OpenVINO's 27.0, against 55.4 and 24.4 in a process of its own
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            method_rows, check = pool.apply(bench, (method, args.data, checkpoint, args.threads))
        rows += method_rows
        checks.append(f"{method}: " + ", ".join(f"{m} {100 * check['fp32'][m]:.2f} -> {100 * check['int8'][m]:.2f}" for m in METRIC_NAMES))
    print(f"\n{len(folder.test)} test images at 256 x 256, {args.threads} threads; ms/image and img/s: inference of "
          "preloaded images; predict img/s: `predict` from the PNG files, decoding overlapped with inference")
    print(markdown_table(["method", "backend", "batch", "ms/image", "img/s", "predict img/s", *(METRIC_TITLES[m] for m in METRIC_NAMES),
                          "max map diff vs PyTorch", "same decisions"], rows))
    print("\nINT8 check at export (fp32 -> INT8 OpenVINO on the synthetic validation set):\n" + "\n".join(checks))
    print("\nTraining seconds per stage:\n" + "\n".join(training))


if __name__ == "__main__":
    main()
