"""Checkpoints: a folder with model.safetensors (weights, no pickle) and config.json.

config.json records the format name and version, the method and its options, and the SHA-256
of the weights file, so a file from elsewhere, a newer format, a truncated copy or a flipped
bit is refused with a message instead of being half-loaded.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .errors import CheckpointError
from .files import sha256_of

FORMAT = "defectflow-checkpoint"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def save_checkpoint(
    path: str | Path,
    method: str,
    config: dict[str, Any],
    state: dict[str, torch.Tensor],
    overwrite: bool = False,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write the checkpoint folder; an existing one is replaced only with overwrite=True.

    The files are written to a temporary folder beside the target first, so a failed save never
    leaves a half-written checkpoint or destroys the previous one.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise CheckpointError(f"{path} already exists; choose another path or pass --overwrite to replace it.")
    if path.exists() and not (path / CONFIG_FILE).is_file():
        raise CheckpointError(f"{path} exists and is not a defectflow checkpoint; refusing to replace it.")
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        tensors = {name: tensor.detach().cpu().contiguous().clone() for name, tensor in state.items()}
        save_file(tensors, str(staging / WEIGHTS_FILE))
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "method": method,
            "config": config,
            "weights_sha256": sha256_of(staging / WEIGHTS_FILE),
            **(extra or {}),
        }
        (staging / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
        if path.exists():
            shutil.rmtree(path)
        staging.rename(path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def read_checkpoint(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(metadata, weights) of a checkpoint folder, after checking format, version and checksum."""
    path = Path(path)
    config_path, weights_path = path / CONFIG_FILE, path / WEIGHTS_FILE
    if not path.is_dir():
        raise CheckpointError(f"Checkpoint folder not found: {path}")
    if not config_path.is_file():
        raise CheckpointError(f"{path} is not a defectflow checkpoint: {CONFIG_FILE} is missing.")
    try:
        meta = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{config_path} is not valid JSON ({exc}); the checkpoint is damaged.") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{config_path} is not a defectflow checkpoint (format {meta.get('format')!r}).")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format version {version}; this defectflow reads version {FORMAT_VERSION}. "
            "Use the defectflow version that wrote it, or retrain."
        )
    if not weights_path.is_file():
        raise CheckpointError(f"{weights_path} is missing; the checkpoint is incomplete.")
    if sha256_of(weights_path) != meta.get("weights_sha256"):
        raise CheckpointError(f"{weights_path} does not match the checksum in {config_path}: the file is corrupt or was replaced.")
    try:
        state = load_file(str(weights_path))
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types for bad files
        raise CheckpointError(f"Cannot read {weights_path}: {exc}") from None
    return meta, state
