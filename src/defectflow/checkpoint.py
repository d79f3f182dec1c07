"""Checkpoints: a folder with model.safetensors (weights, no pickle) and config.json.

config.json records the format name and version, the method and its options, the SHA-256 of
the weights file and (since version 2) the SHA-256 of everything else in config.json, so a file
from elsewhere, a newer format, a truncated copy, a flipped bit or an edited option is refused
with a message instead of being half-loaded. Version 1 (no config checksum) is still read; its
layout is checked key by key instead.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .errors import CheckpointError
from .files import json_digest, normal_permissions, sha256_of, staging_name, unwritable_reason

FORMAT = "defectflow-checkpoint"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
# keys every config.json has, with their JSON types (thresholds and trained_on may be null)
_REQUIRED = {"format": str, "format_version": int, "method": str, "config": dict, "weights_sha256": str}
_OPTIONAL = {"thresholds": dict, "trained_on": dict, "threshold_note": str}


def config_digest(meta: dict[str, Any]) -> str:
    """SHA-256 of config.json's content without its own checksum, in canonical JSON."""
    return json_digest(meta, "config_sha256")


def check_target(path: str | Path, overwrite: bool = False) -> Path:
    """Refuse, before any training, a checkpoint path that save_checkpoint would refuse."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"{path} is a file; choose a folder path for the checkpoint (--out).")
    if path.exists() and not overwrite:
        raise CheckpointError(f"{path} already exists; choose another path or pass --overwrite to replace it.")
    if path.exists() and any(path.iterdir()) and not (path / CONFIG_FILE).is_file():
        raise CheckpointError(f"{path} exists and is not a defectflow checkpoint; refusing to replace it.")
    reason = unwritable_reason(path)
    if reason is not None:
        raise CheckpointError(f"Cannot write the checkpoint {path}: {reason}. Choose another --out.")
    return path


def save_checkpoint(
    path: str | Path,
    method: str,
    config: dict[str, Any],
    state: dict[str, torch.Tensor],
    overwrite: bool = False,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write the checkpoint folder; an existing one is replaced only with overwrite=True.

    The files are written to a hidden folder beside the target first and moved into place with
    renames, so a failed or killed save never leaves a half-written checkpoint at `path` or
    destroys the previous one.
    """
    path = check_target(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_name(path)
    staging.mkdir()  # not tempfile.mkdtemp: that makes the folder 0700; this follows the umask
    try:
        tensors = {name: tensor.detach().cpu().contiguous().clone() for name, tensor in state.items()}
        save_file(tensors, str(staging / WEIGHTS_FILE))
        normal_permissions(staging / WEIGHTS_FILE)  # safetensors makes it 0600
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "method": method,
            "config": config,
            "weights_sha256": sha256_of(staging / WEIGHTS_FILE),
            **(extra or {}),
        }
        meta["config_sha256"] = config_digest(meta)
        (staging / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
        if path.exists():
            old = staging_name(path)
            path.rename(old)
            staging.rename(path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            staging.rename(path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def _check_layout(meta: dict[str, Any], config_path: Path) -> None:
    """Every key present with its JSON type: a damaged config.json fails here, with its name."""
    missing = sorted(set(_REQUIRED) - set(meta))
    if missing:
        raise CheckpointError(f"{config_path} lacks {', '.join(missing)}; the checkpoint is damaged.")
    for key, kind in {**_REQUIRED, **_OPTIONAL}.items():
        value = meta.get(key)
        if (key in _REQUIRED or value is not None) and (not isinstance(value, kind) or isinstance(value, bool)):
            raise CheckpointError(
                f"{config_path}: {key} should be a JSON {kind.__name__}, not {json.dumps(value)[:60]}; the checkpoint is damaged."
            )
    trained_on = meta.get("trained_on")
    if trained_on is not None and not all(isinstance(trained_on.get(k), str) for k in ("category", "root")):
        raise CheckpointError(f"{config_path}: trained_on should name a category and a root folder; the checkpoint is damaged.")


def read_checkpoint(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(metadata, weights) of a checkpoint folder, after checking format, version, layout and checksums."""
    path = Path(path)
    config_path, weights_path = path / CONFIG_FILE, path / WEIGHTS_FILE
    if path.is_file():
        raise CheckpointError(f"{path} is a file; a checkpoint is the folder that train or run wrote (it holds {CONFIG_FILE}).")
    if not path.is_dir():
        raise CheckpointError(f"Checkpoint folder not found: {path}")
    if not config_path.is_file():
        raise CheckpointError(f"{path} is not a defectflow checkpoint: {CONFIG_FILE} is missing.")
    try:
        meta = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{config_path} is not valid JSON ({exc}); the checkpoint is damaged.") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise CheckpointError(f"{config_path} is not a defectflow checkpoint (format {found!r}).")
    version = meta.get("format_version")
    if version not in READABLE_VERSIONS or isinstance(version, bool):
        raise CheckpointError(
            f"{path} has checkpoint format version {version!r}; this defectflow reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}. Use the defectflow version that wrote it, or retrain."
        )
    if version >= 2 and meta.get("config_sha256") != config_digest(meta):
        raise CheckpointError(
            f"{config_path} was changed after it was saved (its checksum config_sha256 does not match): "
            "options of a trained model cannot be edited. Retrain with the options you want."
        )
    _check_layout(meta, config_path)
    if not weights_path.is_file():
        raise CheckpointError(f"{weights_path} is missing; the checkpoint is incomplete.")
    if sha256_of(weights_path) != meta["weights_sha256"]:
        raise CheckpointError(f"{weights_path} does not match the checksum in {config_path}: the file is corrupt or was replaced.")
    try:
        state = load_file(str(weights_path))
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types for bad files
        raise CheckpointError(f"Cannot read {weights_path}: {exc}") from None
    return meta, state
