"""SAM weight download against a real HTTP server on localhost: caching, resume, checksum, cancel, offline."""

import hashlib
import http.server
import json
import os
import re
import socket
import threading

import pytest

from hsam.models import sam_weights
from hsam.models.download import download_sam_weights
from hsam.models.sam_weights import SamCheckpointInfo
from hsam.runtime.errors import Cancelled, CheckpointError, HSAMError, InputError

PAYLOAD = bytes(range(256)) * 2000  # 512,000 bytes
FILENAME = "sam_test_weights.pth"


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves PAYLOAD at /FILENAME with Range support; ``cut_after`` bytes then drops the connection."""

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        server = self.server
        server.requests.append(dict(self.headers))
        if self.path != f"/{FILENAME}":
            self.send_error(404)
            return
        start = 0
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
        if match and server.honour_range:
            start = int(match.group(1))
            if start >= len(PAYLOAD):
                self.send_error(416)
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(PAYLOAD) - 1}/{len(PAYLOAD)}")
        else:
            self.send_response(200)
        body = PAYLOAD[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if server.cut_after is not None:
            self.wfile.write(body[: server.cut_after])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            server.cut_after = None
            return
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server(monkeypatch):
    """A threaded HTTP server on a free port; SAM_URL and a test entry in SAM_CHECKPOINTS point at it."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.requests, httpd.cut_after, httpd.honour_range = [], None, True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setattr(sam_weights, "SAM_URL", f"http://127.0.0.1:{httpd.server_address[1]}/")
    info = SamCheckpointInfo(FILENAME, hashlib.sha256(PAYLOAD).hexdigest(), len(PAYLOAD))
    monkeypatch.setitem(sam_weights.SAM_CHECKPOINTS, "test", info)
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def test_download_writes_the_checked_file_and_reuses_it(server, tmp_path):
    fractions = []
    path = download_sam_weights("test", cache_dir=tmp_path / "cache", progress=lambda f, m: fractions.append(f))
    assert path == tmp_path / "cache" / FILENAME
    assert path.read_bytes() == PAYLOAD
    assert os.listdir(path.parent) == [FILENAME]
    assert fractions[-1] == 1.0 and fractions == sorted(fractions)
    # the verified digest is remembered in the user cache: the first use does not hash the file again
    assert json.loads(sam_weights.sha256_record(path).read_text())["sha256"] == hashlib.sha256(PAYLOAD).hexdigest()

    again = download_sam_weights("test", cache_dir=tmp_path / "cache")
    assert again == path and len(server.requests) == 1  # cached: no second request


def test_default_cache_dir_follows_hsam_home(server, tmp_path, monkeypatch):
    monkeypatch.setenv("HSAM_HOME", str(tmp_path / "home"))
    path = download_sam_weights("test")
    assert path == tmp_path / "home" / "checkpoints" / FILENAME


def test_interrupted_download_resumes_with_a_range_request(server, tmp_path):
    server.cut_after = 200_000
    with pytest.raises(HSAMError, match="run it again to resume"):
        download_sam_weights("test", cache_dir=tmp_path)
    partial = tmp_path / (FILENAME + ".part")
    assert partial.stat().st_size == 200_000
    assert not (tmp_path / FILENAME).exists()

    path = download_sam_weights("test", cache_dir=tmp_path)
    assert path.read_bytes() == PAYLOAD
    assert server.requests[-1]["Range"] == "bytes=200000-"


def test_server_ignoring_the_range_restarts_from_zero(server, tmp_path):
    (tmp_path / (FILENAME + ".part")).write_bytes(b"x" * 1000)
    server.honour_range = False
    assert download_sam_weights("test", cache_dir=tmp_path).read_bytes() == PAYLOAD


def test_checksum_mismatch_deletes_the_download(server, tmp_path, monkeypatch):
    wrong = SamCheckpointInfo(FILENAME, "0" * 64, len(PAYLOAD))
    monkeypatch.setitem(sam_weights.SAM_CHECKPOINTS, "test", wrong)
    with pytest.raises(CheckpointError, match="sha256"):
        download_sam_weights("test", cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_corrupt_partial_file_fails_the_checksum(server, tmp_path):
    (tmp_path / (FILENAME + ".part")).write_bytes(b"\xff" * 1000)  # resumed from bytes that are wrong
    with pytest.raises(CheckpointError, match="sha256"):
        download_sam_weights("test", cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []
    assert download_sam_weights("test", cache_dir=tmp_path).read_bytes() == PAYLOAD


def test_cancel_keeps_the_partial_file_for_later(server, tmp_path, monkeypatch):
    monkeypatch.setattr("hsam.models.download.CHUNK_SIZE", 64 * 1024)
    cancel = threading.Event()
    with pytest.raises(Cancelled):
        download_sam_weights("test", cache_dir=tmp_path, progress=lambda f, m: cancel.set(), cancel=cancel)
    assert not (tmp_path / FILENAME).exists()
    assert 0 < (tmp_path / (FILENAME + ".part")).stat().st_size < len(PAYLOAD)


def test_unreachable_server_says_what_to_do(tmp_path, monkeypatch):
    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(sam_weights, "SAM_URL", f"http://127.0.0.1:{port}/")
    with pytest.raises(HSAMError, match=r"cannot reach 127\.0\.0\.1: .*copy sam_vit_b_01ec64\.pth into .*--sam-checkpoint"):
        download_sam_weights("vit_b", cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_http_error_and_unknown_name(server, tmp_path, monkeypatch):
    monkeypatch.setitem(sam_weights.SAM_CHECKPOINTS, "test", SamCheckpointInfo("missing.pth", "0" * 64, 10))
    with pytest.raises(HSAMError, match="HTTP 404"):
        download_sam_weights("test", cache_dir=tmp_path)
    with pytest.raises(InputError, match="vit_b"):
        download_sam_weights("vit_x", cache_dir=tmp_path)
