"""Benchmark: PyTorch vs ONNX Runtime inference of saved models on MVTec AD bottle's test set.

    HF_HOME=../shared/hf-home HF_HUB_OFFLINE=1 python benchmarks/onnx_bottle.py \\
        runs/bench-bottle/cflow/bottle/run-0/model runs/bench-bottle/clscnf/bottle/run-0/model

Exports each checkpoint (into its folder, unless already exported), predicts all test images
one at a time with both backends (as an inspection line would) and prints ms/image, the largest
map and score difference, and whether the OK/DEFECT decisions agree.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

import defectflow
from defectflow.data.folder import AnomalyFolder
from defectflow.export import ONNX_FILE, export_onnx
from defectflow.report import markdown_table


def timed_predict(detector, folder: AnomalyFolder) -> tuple[object, float]:
    detector.config.batch_size = 1
    detector.predict(folder.test[:2], progress=False)  # warm-up
    start = time.perf_counter()
    prediction = detector.predict(folder, progress=False)
    return prediction, 1000.0 * (time.perf_counter() - start) / len(folder.test)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+", type=Path)
    parser.add_argument("--data", default="../shared/data/mvtec/bottle")
    args = parser.parse_args()
    folder = AnomalyFolder.scan(args.data)
    rows = []
    for checkpoint in args.checkpoints:
        if not (checkpoint / ONNX_FILE).exists():
            start = time.perf_counter()
            export_onnx(defectflow.load(checkpoint, device="cpu"), checkpoint)
            print(f"exported {checkpoint} in {time.perf_counter() - start:.1f} s")
        detector = defectflow.load(checkpoint, device="cpu")
        torch_run, torch_ms = timed_predict(detector, folder)
        onnx_run, onnx_ms = timed_predict(defectflow.load(checkpoint, device="cpu", backend="onnx"), folder)
        map_diff = float(np.abs(torch_run.maps - onnx_run.maps).max())
        score_diff = float(np.abs(torch_run.scores - onnx_run.scores).max())
        same = bool(np.array_equal(torch_run.defective, onnx_run.defective)) if torch_run.defective is not None else "n/a"
        rows.append([detector.method, f"{torch_ms:.1f}", f"{onnx_ms:.1f}", f"{map_diff:.2e}", f"{score_diff:.2e}", str(same)])
    print(f"torch threads: {torch.get_num_threads()}; {len(folder.test)} test images, one per call")
    print(markdown_table(["method", "PyTorch ms/img", "ONNX Runtime ms/img", "max abs map diff", "max abs score diff", "same decisions"], rows))


if __name__ == "__main__":
    main()
