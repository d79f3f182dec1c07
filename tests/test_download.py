"""download: resume, checksum, offline message and safe unpacking, against a local server."""

import hashlib
import http.server
import io
import tarfile
import threading
from pathlib import Path

import pytest

from defectflow.data.download import download_file, extract, fetch
from defectflow.errors import DataError

PAYLOAD = bytes(range(256)) * 400  # 100 kB


class RangeHandler(http.server.BaseHTTPRequestHandler):
    """Serves PAYLOAD at any path, honouring 'Range: bytes=N-' like a real file server."""

    served_ranges: list = []

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        body = self.server.payload  # type: ignore[attr-defined]
        start = 0
        header = self.headers.get("Range")
        if header:
            start = int(header.split("=")[1].split("-")[0])
            self.send_response(206)
        else:
            self.send_response(200)
        RangeHandler.served_ranges.append(start)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        self.wfile.write(body[start:])

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RangeHandler)
    httpd.payload = PAYLOAD
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    RangeHandler.served_ranges = []
    yield httpd
    httpd.shutdown()


def _url(server, name: str = "data.bin") -> str:
    return f"http://127.0.0.1:{server.server_address[1]}/{name}"


def test_download_verifies_checksum(server, tmp_path: Path) -> None:
    digest = hashlib.sha256(PAYLOAD).hexdigest()
    path = download_file(_url(server), tmp_path / "data.bin", digest, progress=False)
    assert path.read_bytes() == PAYLOAD


def test_download_resumes_from_partial_file(server, tmp_path: Path) -> None:
    (tmp_path / "data.bin.part").write_bytes(PAYLOAD[:30000])
    path = download_file(_url(server), tmp_path / "data.bin", hashlib.sha256(PAYLOAD).hexdigest(), progress=False)
    assert path.read_bytes() == PAYLOAD
    assert RangeHandler.served_ranges == [30000]


def test_checksum_mismatch_is_an_error_and_keeps_the_file_aside(server, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="expected 0000"):
        download_file(_url(server), tmp_path / "data.bin", "0" * 64, progress=False)
    assert (tmp_path / "data.bin.bad").exists() and not (tmp_path / "data.bin").exists()


def test_offline_error_says_where_to_put_the_archive(tmp_path: Path) -> None:
    import socket

    with socket.socket() as sock:  # a port with nothing listening
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(DataError, match=r"needs internet.*put it at .*archive.tar"):
        download_file(f"http://127.0.0.1:{port}/archive.tar", tmp_path / "archive.tar", progress=False, timeout=5)


def _tar_with(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def test_fetch_unpacks_an_archive_already_in_place_without_network(tmp_path: Path) -> None:
    archive = _tar_with({"dtd/images/banded/banded_0001.jpg": b"jpg"})
    (tmp_path / "dtd-r1.0.1.tar.gz").write_bytes(archive)
    digest = hashlib.sha256(archive).hexdigest()
    root = fetch("dtd", tmp_path, url="http://127.0.0.1:9/dtd-r1.0.1.tar.gz", sha256=digest, progress=False)
    assert (root / "dtd" / "images" / "banded" / "banded_0001.jpg").read_bytes() == b"jpg"


def test_unpacking_refuses_paths_outside_the_root(tmp_path: Path) -> None:
    archive = tmp_path / "evil.tar.gz"
    archive.write_bytes(_tar_with({"../escaped.txt": b"x"}))
    with pytest.raises(DataError, match="outside"):
        extract(archive, tmp_path / "root")
    assert not (tmp_path / "escaped.txt").exists()
