"""The method registry: one name per method, one way to build or load a detector."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..checkpoint import read_checkpoint
from ..backends import BACKENDS
from ..errors import CheckpointError, ConfigError
from .base import Detector, DetectorConfig, Evaluation, Prediction
from .cflow import CFlowConfig, CFlowDetector
from .clscnf import ClsCNFConfig, ClsCNFDetector
from .differnet import DifferNetConfig, DifferNetDetector

METHODS: dict[str, type[Detector]] = {CFlowDetector.method: CFlowDetector, ClsCNFDetector.method: ClsCNFDetector,
                                     DifferNetDetector.method: DifferNetDetector}


def create(method: str, **options: Any) -> Detector:
    """A new, untrained detector of the named method with the given options."""
    if method not in METHODS:
        raise ConfigError(f"Unknown method {method!r}: choose one of {', '.join(METHODS)}.")
    return METHODS[method](**options)


def load(path: str | Path, device: str | None = None, backend: str = "torch", onnx: str | Path | None = None) -> Detector:
    """A trained detector from a checkpoint folder written by Detector.save. backend "onnx" runs
    the graph exported into that folder (defectflow export), or the file `onnx`, with onnxruntime;
    "openvino" the same graph with OpenVINO; "openvino-int8" its INT8 model (export --int8)."""
    if backend not in BACKENDS:
        raise ConfigError(f"Unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}.")
    if onnx is not None and BACKENDS[backend] is None:
        raise ConfigError(f"An exported file (--onnx) is run with --backend {' or '.join(b for b, c in BACKENDS.items() if c)}.")
    meta, state = read_checkpoint(path)
    method = meta.get("method")
    if method not in METHODS:
        raise CheckpointError(f"{path} holds a {method!r} model, which this defectflow does not know.")
    try:
        detector = METHODS[method].from_checkpoint(meta, state, device)
    except CheckpointError as exc:
        what = str(exc) if str(exc).endswith((".", "?")) else f"{exc}."
        raise CheckpointError(f"{path}: {what} If another version of defectflow wrote it, load it with that version; "
                              "otherwise retrain the model (defectflow train).") from None
    root = detector.trained_on["root"] if detector.trained_on else None
    if root is not None and not Path(root).is_absolute():  # older checkpoints: relative to the checkpoint, not the cwd
        detector.trained_on = {**detector.trained_on, "root": os.path.normpath(Path(path).absolute() / root)}
    if BACKENDS[backend] is not None:
        detector.backend = BACKENDS[backend](path, onnx)
        detector.thresholds = detector.backend.thresholds or detector.thresholds
    return detector

__all__ = ["BACKENDS", "METHODS", "CFlowConfig", "CFlowDetector", "ClsCNFConfig", "ClsCNFDetector", "DifferNetConfig", "DifferNetDetector", "Detector", "DetectorConfig", "Evaluation", "Prediction", "create", "load"]
