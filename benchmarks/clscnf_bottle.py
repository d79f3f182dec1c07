"""Benchmark: every mode of the paper's tables on the whole MVTec AD bottle category, one run.

    HF_HOME=../shared/hf-home HF_HUB_OFFLINE=1 python benchmarks/clscnf_bottle.py

Same backbone (tf_efficientnet_lite0), seed and flow settings for all rows:
  CFlow-AD            flows on the ImageNet extractor (the baseline)
  classifier          the clscnf classifier head alone
  flows (fine-tuned)  the flow head alone on the extractor stage 1 fine-tuned (the paper's shared system)
  joint (shared)      the paper's system: fused map, one extractor pass for both heads
  joint (clscnf)      the default: the same classifier, flows on the ImageNet weights of the stages stage 1
                      tuned, branching off the untuned shallow stages both heads share
Prints the four metrics, training time per stage and inference ms/image.
"""

from __future__ import annotations

import argparse
import time

import defectflow
from defectflow.data.folder import AnomalyFolder
from defectflow.report import format_table


def main() -> None:
    defectflow.keep_freed_memory()  # as the CLI does (defectflow/memory.py)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="../shared/data/mvtec/bottle")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--frozen-epochs", type=int, help="stage-1 epochs, extractor frozen (default: clscnf's)")
    parser.add_argument("--joint-epochs", type=int, help="stage-1 epochs, fine-tuning (default: clscnf's)")
    args = parser.parse_args()

    folder = AnomalyFolder.scan(args.data)

    def timed_fit(detector, **kwargs):
        start = time.perf_counter()
        detector.fit(folder, **kwargs)
        return detector, time.perf_counter() - start

    baseline, baseline_s = timed_fit(defectflow.create("cflow", seed=args.seed))
    schedule = {k: v for k, v in (("frozen_epochs", args.frozen_epochs), ("joint_epochs", args.joint_epochs)) if v is not None}
    clscnf_options = dict(seed=args.seed, foreground=True, **schedule)
    default, default_s = timed_fit(defectflow.create("clscnf", **clscnf_options))
    shared, _ = timed_fit(defectflow.create("clscnf", **clscnf_options, shared=True), classifier_from=default)

    base_eval, default_eval, shared_eval = (d.evaluate(folder) for d in (baseline, default, shared))
    stage1 = default.fit_seconds["prepare"] + default.fit_seconds["classifier"]
    shared_s = stage1 + shared.fit_seconds["flows"]
    rows = [
        ("CFlow-AD (ImageNet extractor)", base_eval.metrics, baseline_s, base_eval.ms_per_image),
        ("classifier alone", default_eval.head_metrics["classifier"], stage1, default_eval.ms_per_image),
        ("flows (fine-tuned extractor)", shared_eval.head_metrics["flow"], shared_s, shared_eval.ms_per_image),
        ("joint, shared (the paper's)", shared_eval.metrics, shared_s, shared_eval.ms_per_image),
        ("joint, flows on ImageNet stages (clscnf)", default_eval.metrics, default_s, default_eval.ms_per_image),
    ]
    print(format_table(rows, time_columns=True))
    print("Train s: the whole training of that row's model; rows from one model share its ms/img.")
    print(f"clscnf stages (s): {', '.join(f'{k} {v:.1f}' for k, v in default.fit_seconds.items())}; "
          f"CFlow-AD: {', '.join(f'{k} {v:.1f}' for k, v in baseline.fit_seconds.items())}; "
          f"shared flows: {shared.fit_seconds['flows']:.1f} (stage 1 reused from the default model)")
    print("stage 1 per epoch:", default.classifier_history)


if __name__ == "__main__":
    main()
