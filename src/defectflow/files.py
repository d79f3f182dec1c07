"""Small file helpers shared by checkpoints, downloads, results and pictures."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import IO, Iterable, Iterator

import numpy as np
from PIL import Image


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def json_digest(content: dict, without: str) -> str:
    """SHA-256 of a JSON object's content without the key that holds this checksum, in canonical JSON."""
    rest = {k: v for k, v in content.items() if k != without}
    return hashlib.sha256(json.dumps(rest, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def is_inside(path: str | Path, folder: str | Path) -> bool:
    """Whether path is folder or lies below it, links resolved (a path that does not exist yet too)."""
    return Path(path).resolve().is_relative_to(Path(folder).resolve())


def containing(path: str | Path, folders: Iterable[str | Path]) -> Path | None:
    """The first of folders that path is or lies inside (see is_inside), or None."""
    return next((Path(folder) for folder in folders if is_inside(path, folder)), None)


def staging_name(path: Path) -> Path:
    """A hidden, unique sibling of path to write into before os.replace: hidden, so a scan for
    finished outputs (checkpoints, images) never takes a half-written one for real."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w", **kwargs) -> Iterator[IO]:
    """open() for writing whose file appears at `path` complete or not at all (temp file + os.replace);
    an interrupted write leaves the previous file, if any, untouched. Permissions follow the umask."""
    path = Path(path)
    staging = staging_name(path)
    try:
        with staging.open(mode, **kwargs) as handle:
            yield handle
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_open(path, "w", encoding="utf-8") as handle:
        handle.write(text)


def save_png(path: Path, array: np.ndarray) -> None:
    """A float array in [0, 1] (HxW or HxWx3) as an 8-bit PNG; parent folders are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((np.clip(array, 0, 1) * 255).round().astype(np.uint8)).save(path)


def unwritable_reason(path: str | Path) -> str | None:
    """Why `path` could not be created or written (a file on its way, a read-only folder), or None.
    Checked before long work so that it fails in a second, not after training."""
    path = Path(path).absolute()
    ancestor = path if path.exists() else path.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        return f"{ancestor} is a file, not a folder"
    if not os.access(ancestor, os.W_OK | os.X_OK):
        return f"{ancestor} is not writable"
    return None


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def normal_permissions(path: str | Path) -> None:
    """rw for whom the umask allows, as open() gives: for files a library creates 0600 (safetensors)."""
    os.chmod(path, 0o666 & ~current_umask())
