"""Benchmark: how well each level's flow fits when levels share epochs vs. share steps.

    HF_HOME=../shared/hf-home HF_HUB_OFFLINE=1 python benchmarks/flow_steps_bottle.py

Caches lite0 features of levels 1-4 for the bottle training images (10% held out, as `fit`
does), trains the flows two ways and prints each level's NLL per dimension on the held-out good
images (lower is a better density fit; no test image is used) and the training wall time:

- "once per epoch" (defectflow before 2026-11-24, with the then benchmark settings): each epoch
  draws a level's own vectors, at most 200,000, in batches of 1024, so a level with few vectors
  per image takes few steps (each level's flow is trained alone, which gives it those steps);
- "equal" (now): the default settings, all levels together: every level draws 64,000 vectors per
  epoch in batches of 256.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

import defectflow
from defectflow.data.folder import AnomalyFolder
from defectflow.heads.flows import ConditionalFlows
from defectflow.methods.base import hold_out
from defectflow.methods.cflow import CFlowConfig, build_flow_scorer, collect_features, train_flows, vectors_per_epoch
from defectflow.report import markdown_table

LEVELS = (1, 2, 3, 4)
STRIDES = {1: 4, 2: 8, 3: 16, 4: 32}


def seed(value: int) -> None:
    """Both generators flows draw from: torch for weights and batches, numpy for FrEIA's soft permutations."""
    torch.manual_seed(value)
    np.random.seed(value)


def main() -> None:
    defectflow.keep_freed_memory()  # as the CLI does (defectflow/memory.py)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="../shared/data/mvtec/bottle")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    detector = defectflow.create("cflow", levels=LEVELS, seed=args.seed)
    extractor = detector.build_extractor(pretrained=True).eval()
    train = list(AnomalyFolder.scan(args.data, require_test=False).train)
    held_out, fit = hold_out(train, detector.config.val_fraction, args.seed)
    device = detector.device
    features = collect_features(extractor, (b["image"] for b in detector.loader(fit)), device)
    held_out_features = collect_features(extractor, (b["image"] for b in detector.loader(held_out)), device)

    counts = [f.shape[0] * f.shape[2] * f.shape[3] for f in features]
    channels = [f.shape[1] for f in features]

    def steps(config: CFlowConfig, level_counts: list[int]) -> int:
        return config.meta_epochs * config.sub_epochs * -(-vectors_per_epoch(config, level_counts) // config.fiber_batch)

    def held_out_nll(flows: ConditionalFlows, index: int, level: int) -> float:
        with torch.no_grad():
            return -flows.level_log_likelihood(level, held_out_features[index]).mean().item()

    # drawn once per epoch: each level's flow trained alone on its own vectors (the old schedule)
    old_nll, old_steps, old_seconds = [], [], 0.0
    for index in range(len(LEVELS)):
        config = CFlowConfig(fiber_batch=1024, epoch_vectors=min(counts[index], 200_000))
        seed(args.seed)
        flows = build_flow_scorer(config, [channels[index]]).flows.to(device)
        start = time.perf_counter()
        train_flows(flows, [features[index]], config, progress=False)
        old_seconds += time.perf_counter() - start
        old_nll.append(held_out_nll(flows, index, 0))
        old_steps.append(steps(config, [counts[index]]))

    # equal steps: all levels together with the default settings, as CFlowDetector trains them
    config = CFlowConfig()
    seed(args.seed)
    flows = build_flow_scorer(config, channels).flows.to(device)
    start = time.perf_counter()
    train_flows(flows, features, config, progress=False)
    new_seconds = time.perf_counter() - start
    new_steps = steps(config, counts)

    rows = [
        [f"{level} (stride {STRIDES[level]})", f"{counts[i]:,}", str(old_steps[i]), f"{old_nll[i]:.3f}", str(new_steps),
         f"{held_out_nll(flows, i, i):.3f}"]
        for i, level in enumerate(LEVELS)
    ]
    header = ["Level", "Training vectors", "Steps, once per epoch", "Held-out NLL/dim", "Steps, equal", "Held-out NLL/dim"]
    print(markdown_table(header, rows))
    print(f"training seconds, all levels: drawn once per epoch {old_seconds:.1f}, equal steps {new_seconds:.1f}")


if __name__ == "__main__":
    main()
