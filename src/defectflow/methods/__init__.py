"""The method registry: one name per method, one way to build or load a detector."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..checkpoint import read_checkpoint
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


BACKENDS = ("torch", "onnx")


def load(path: str | Path, device: str | None = None, backend: str = "torch") -> Detector:
    """A trained detector from a checkpoint folder written by Detector.save; backend "onnx" runs
    the graph exported into that folder (defectflow export) with onnxruntime instead of PyTorch."""
    if backend not in BACKENDS:
        raise ConfigError(f"Unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}.")
    meta, state = read_checkpoint(path)
    method = meta.get("method")
    if method not in METHODS:
        raise CheckpointError(f"{path} holds a {method!r} model, which this defectflow does not know.")
    detector = METHODS[method].from_checkpoint(meta, state, device)
    if backend == "onnx":
        from ..export import OnnxBackend

        detector.backend = OnnxBackend(path)
    return detector


__all__ = ["METHODS", "CFlowConfig", "CFlowDetector", "ClsCNFConfig", "ClsCNFDetector", "DifferNetConfig", "DifferNetDetector", "Detector", "DetectorConfig", "Evaluation", "Prediction", "create", "load"]
