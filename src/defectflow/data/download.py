"""Fetch and unpack MVTec AD, BTAD and DTD for users with internet.

Downloads resume from a .part file (HTTP Range), are checked against a SHA-256 where one is
known, and unpack with path checks. Offline, the error says where to put a copy of the archive
fetched elsewhere: a file already in place is verified and unpacked without any network.
"""

from __future__ import annotations

import tarfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from ..errors import DataError
from ..files import sha256_of


@dataclass(frozen=True)
class Archive:
    url: str
    sha256: str | None  # None where no published checksum is known
    marker: str  # a path inside the unpacked archive that shows it is already there

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]


ARCHIVES = {
    "mvtec": Archive(
        "https://www.mydrive.ch/shares/38536/3830184030e49fe74747669442f0f282/download/420938113-1629952094/"
        "mvtec_anomaly_detection.tar.xz",
        "cf4313b13603bec67abb49ca959488f7eedce2a9f7795ec54446c649ac98cd3d",
        "bottle/train/good",
    ),
    "btad": Archive("https://avires.dimi.uniud.it/papers/btad/btad.zip", None, "BTech_Dataset_transformed/01/train"),
    "dtd": Archive(
        "https://www.robots.ox.ac.uk/~vgg/data/dtd/download/dtd-r1.0.1.tar.gz",
        "e42855a52a4950a3b59612834602aa253914755c95b0cff9ead6d07395f8e205",
        "dtd/images",
    ),
}


def download_file(url: str, dest: Path, sha256: str | None = None, progress: bool = True, timeout: float = 60.0) -> Path:
    """Download url to dest, resuming a previous partial download, and verify it."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.is_file():
        _verify(dest, sha256)
        return dest
    part = dest.with_name(dest.name + ".part")
    offset = part.stat().st_size if part.is_file() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:  # nothing left to fetch: the .part file is complete
            part.rename(dest)
            _verify(dest, sha256)
            return dest
        raise DataError(f"Download of {url} failed: HTTP {exc.code} {exc.reason}.") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise DataError(
            f"Cannot reach {url} ({reason}). `defectflow download` needs internet. On an offline machine, "
            f"fetch that file elsewhere and put it at {dest}; running the command again verifies and unpacks it."
        ) from None
    with response:
        resumed = offset and response.status == 206
        mode = "ab" if resumed else "wb"
        start = offset if resumed else 0
        length = response.headers.get("Content-Length")
        total = start + int(length) if length is not None else None
        with part.open(mode) as handle, tqdm(
            total=total, initial=start, unit="B", unit_scale=True, desc=dest.name, disable=not progress
        ) as bar:
            for block in iter(lambda: response.read(1 << 20), b""):
                handle.write(block)
                bar.update(len(block))
    part.rename(dest)
    _verify(dest, sha256)
    return dest


def _verify(path: Path, sha256: str | None) -> None:
    if sha256 is None:
        return
    actual = sha256_of(path)
    if actual != sha256:
        bad = path.with_name(path.name + ".bad")
        path.rename(bad)
        raise DataError(
            f"{path.name} has SHA-256 {actual}, expected {sha256}; it was moved to {bad}. "
            "Run the download again (the server may have sent an error page or a changed file)."
        )


def _check_member(root: Path, name: str) -> None:
    target = (root / name).resolve()
    if root.resolve() not in (target, *target.parents):
        raise DataError(f"Archive member {name!r} would be written outside {root}; refusing to unpack.")


def extract(archive: Path, root: Path) -> None:
    """Unpack a .tar.* or .zip archive below root, refusing members that escape it."""
    root.mkdir(parents=True, exist_ok=True)
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as handle:
            for name in handle.namelist():
                _check_member(root, name)
            handle.extractall(root)
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive) as handle:
            for member in handle.getmembers():
                _check_member(root, member.name)
            handle.extractall(root, filter="data")
    else:
        raise DataError(f"{archive} is neither a zip nor a tar archive.")


def fetch(name: str, root: str | Path, url: str | None = None, sha256: str | None = None, progress: bool = True) -> Path:
    """Download (or reuse) and unpack a named dataset below root; returns root."""
    if name not in ARCHIVES:
        raise DataError(f"Unknown dataset {name!r}: choose one of {', '.join(ARCHIVES)}.")
    known = ARCHIVES[name]
    archive = Archive(url or known.url, sha256 if url else known.sha256, known.marker)
    root = Path(root)
    if (root / archive.marker).exists():
        return root
    path = download_file(archive.url, root / archive.filename, archive.sha256, progress=progress)
    extract(path, root)
    if not (root / archive.marker).exists():
        raise DataError(f"Unpacked {path} but {root / archive.marker} is not there; is it the right archive?")
    return root
