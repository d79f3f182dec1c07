"""Benchmark: DifferNet on the whole MVTec AD bottle category.

    HF_HOME=../shared/hf-home HF_HUB_OFFLINE=1 python benchmarks/differnet_bottle.py

tf_efficientnet_lite0 features pooled at three scales (ImageNet AlexNet weights cannot be fetched
on these machines; `--backbone alexnet --levels 2` works where they can). Prints image AUROC
(last, and best with its epoch, from the per-meta-epoch log), training time and inference
ms/image, with the tool's defaults unless options say otherwise; the saved model would be the
last one, never the best on test.
"""

from __future__ import annotations

import argparse
import time

import defectflow
from defectflow.data.folder import AnomalyFolder
from defectflow.methods import DifferNetConfig
from defectflow.report import format_table


def main() -> None:
    defectflow.keep_freed_memory()  # as the CLI does (defectflow/memory.py)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="../shared/data/mvtec/bottle")
    defaults = DifferNetConfig()
    parser.add_argument("--meta-epochs", type=int, default=defaults.meta_epochs)
    parser.add_argument("--sub-epochs", type=int, default=defaults.sub_epochs)
    parser.add_argument("--test-rotations", type=int, default=defaults.test_rotations)
    parser.add_argument("--augment-copies", type=int, default=defaults.augment_copies)
    parser.add_argument("--input-size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    folder = AnomalyFolder.scan(args.data)
    detector = defectflow.create(
        "differnet", meta_epochs=args.meta_epochs, sub_epochs=args.sub_epochs, test_rotations=args.test_rotations,
        augment_copies=args.augment_copies, input_size=args.input_size, seed=args.seed,
    )
    start = time.perf_counter()
    detector.fit(folder, log_test=True)
    train_seconds = time.perf_counter() - start
    evaluation = detector.evaluate(folder)
    summary = detector.epoch_summary()
    print(format_table([("differnet", evaluation.metrics, train_seconds, evaluation.ms_per_image)], time_columns=True))
    print(f"image AUROC per meta-epoch: {', '.join(f'{100 * a:.2f}' for a in summary['per_epoch'])}")
    print(f"last {100 * summary['last']:.2f}, best {100 * summary['best']:.2f} at meta-epoch {summary['best_epoch']}")
    print(f"training seconds by part: {', '.join(f'{k} {v:.1f}' for k, v in detector.fit_seconds.items())} "
          "(extract includes the cached test vectors for the per-epoch log, which fit() leaves out by default)")
    print(f"settings: {detector.config.to_json()}")


if __name__ == "__main__":
    main()
