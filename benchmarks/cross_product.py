"""Benchmark: every method's defaults across products, beside the previous defaults, in one run.

    HF_HOME=../shared/hf-home HF_HUB_OFFLINE=1 python benchmarks/cross_product.py \
        --datasets bottle kolektorsdd elpv --methods cflow clscnf differnet

Data sets: MVTec AD bottle (square, centred object, large defects), KolektorSDD (500 x ~1260
grayscale commutators, hairline cracks) from ../shared/data, and the built-in elpv task (mono
solar cells, image labels only); `--datasets bottle-moved` adds bottle rotated and shifted at
random, a product whose position varies (benchmarks/moved_parts.py). For each data set and method it trains with the tool's defaults
("now") and with the previous defaults ("before": square 256 x 256 input, nearest-neighbour mask
resizing, the old image score, no per-pixel normal level in the flow map, flows on single cells,
clscnf's flows on the fine-tuned extractor; clscnf is also fused the other way from the same training), and prints the four metrics, how many defective parts pass as OK and how many good parts are flagged
at the operating threshold, training seconds and ms/image.
Options after `--` go to every "now" run (e.g. `-- image_score=max`) to compare one change.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import time
from pathlib import Path

import defectflow
from defectflow.data.elpv import prepare_elpv
from defectflow.data.folder import AnomalyFolder
from defectflow.methods import METHODS
from defectflow.report import format_table
from defectflow.thresholds import far_threshold
from defectflow.workflow import decision_counts
from moved_parts import moved_copy

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
DATASETS = {"bottle": lambda: SHARED / "mvtec" / "bottle", "kolektorsdd": lambda: SHARED / "kolektorsdd", "elpv": prepare_elpv,
            "bottle-moved": lambda: moved_copy(SHARED / "mvtec" / "bottle")}
PREVIOUS = {"input_size": (256, 256), "mask_resampling": "nearest", "image_score": "max", "position_reference": "off",
            "shared": True, "flow_neighbourhood": 1}


def run_one(method: str, folder: AnomalyFolder, options: dict) -> tuple[dict, str, defectflow.Detector]:
    detector = defectflow.create(method, **options)
    start = time.perf_counter()
    detector.fit(folder, progress=False)
    return figures(detector, folder, time.perf_counter() - start), f"{detector.image_size[0]}x{detector.image_size[1]}", detector


def figures(detector: defectflow.Detector, folder: AnomalyFolder, train_seconds: float) -> dict:
    evaluation = detector.evaluate(folder, progress=False)
    counts = decision_counts(evaluation) or {}
    row = {
        "metrics": evaluation.metrics, "train_seconds": train_seconds, "ms_per_image": evaluation.ms_per_image,
        "defective_passed": counts.get("FN"), "defective": int(evaluation.labels.sum()),
        "false_alarms": counts.get("FP"), "good": int((evaluation.labels == 0).sum()),
        "image_size": list(detector.image_size), "heads": evaluation.head_metrics,
        "invalid_good": int(evaluation.prediction.invalid[evaluation.labels == 0].sum()),
    }
    thresholds = detector.thresholds
    if thresholds is not None and thresholds.extrapolated_from is not None:
        # the same model at the rule without extrapolation: just above every held-out good image
        empirical = far_threshold(detector.predict_images(detector.validation.clean).scores, thresholds.target_far)
        flagged = (evaluation.prediction.scores >= empirical) | evaluation.prediction.invalid
        defective = evaluation.labels == 1
        row["above_held_out"] = {"defective_passed": int((defective & ~flagged).sum()), "false_alarms": int((~defective & flagged).sum())}
    return row


def main() -> None:
    defectflow.keep_freed_memory()  # as the CLI does (defectflow/memory.py)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--methods", nargs="+", default=["cflow", "clscnf", "differnet"])
    parser.add_argument("--only", choices=["now", "before"], help="run one of the two settings")
    parser.add_argument("--json", type=Path, help="also write every figure to this JSON file")
    parser.add_argument("options", nargs="*", help="NAME=VALUE options for the 'now' runs")
    args = parser.parse_args()
    extra = {k: ast.literal_eval(v) if v[:1] in "([0123456789-" else v for k, v in (o.split("=", 1) for o in args.options)}

    results = {}
    for dataset in args.datasets:
        folder = AnomalyFolder.scan(DATASETS[dataset]())
        rows, lines = [], []
        for method in args.methods:
            for setting in ("before", "now"):
                if args.only and setting != args.only:
                    continue
                if setting == "now":
                    options = dict(extra)
                else:
                    options = dict(PREVIOUS)
                    own = {f.name for f in dataclasses.fields(METHODS[method].config_class)}
                    options = {k: v for k, v in options.items() if k in own}
                row, size, detector = run_one(method, folder, options)
                variants = [(f"{method} {setting} ({size})", row)]
                if method == "clscnf" and setting == "now":
                    # the same training fused the other way (calibrated heads / weight tuned on synthetic defects)
                    other = "calibrated" if detector.config.fusion == "tuned" else "tuned"
                    detector.set_fusion(other)
                    variants.append((f"{method} {setting}, fusion {other} ({size})", figures(detector, folder, row["train_seconds"])))
                for label, row in variants:
                    results[f"{dataset}/{label}"] = row
                    rows.append((label, row["metrics"], row["train_seconds"], row["ms_per_image"]))
                    rows += [(f"  {head} alone", metrics, None, None) for head, metrics in row["heads"].items()]
                    lines.append(f"{label}: {row['defective_passed']} of {row['defective']} defective passed as OK, "
                                 f"{row['false_alarms']} of {row['good']} good flagged ({row['invalid_good']} as INVALID)")
                    if "above_held_out" in row:
                        lines[-1] += (f"; threshold extrapolated from {detector.thresholds.extrapolated_from} held-out images "
                                      f"(just above them instead: {row['above_held_out']['defective_passed']} passed, "
                                      f"{row['above_held_out']['false_alarms']} flagged)")
                    print(f"[{dataset}] {lines[-1]}; {row['train_seconds']:.0f} s", flush=True)
        print(f"\n## {dataset}\n\n{format_table(rows, time_columns=True)}\n\n" + "\n".join(lines) + "\n", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
