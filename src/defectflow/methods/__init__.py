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


def load(path: str | Path, device: str | None = None) -> Detector:
    """A trained detector from a checkpoint folder written by Detector.save."""
    meta, state = read_checkpoint(path)
    method = meta.get("method")
    if method not in METHODS:
        raise CheckpointError(f"{path} holds a {method!r} model, which this defectflow does not know.")
    return METHODS[method].from_checkpoint(meta, state, device)


__all__ = ["METHODS", "CFlowConfig", "CFlowDetector", "ClsCNFConfig", "ClsCNFDetector", "DifferNetConfig", "DifferNetDetector", "Detector", "DetectorConfig", "Evaluation", "Prediction", "create", "load"]
