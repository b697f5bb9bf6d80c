"""fetch(): local paths, s3:// objects and folders, resumable http(s) downloads, all verified."""
import hashlib
import http.server
import os
import threading

import pytest

from dmdr.errors import UserError
from dmdr.fetch import fetch
from dmdr.storage import StorageConfig
from helpers_s3 import TcpProxy, bucket, moto, s3_env  # noqa: F401

pytestmark = pytest.mark.slow
DATA = os.urandom(300_000)
SHA = hashlib.sha256(DATA).hexdigest()


class _RangeHandler(http.server.BaseHTTPRequestHandler):
    """Serves DATA at /weights.bin with Range support; the first reply dies halfway."""

    seen_ranges: list = []
    drop_first = True

    def do_GET(self):  # noqa: N802
        if self.path != "/weights.bin":
            self.send_error(404)
            return
        start = 0
        if rng := self.headers.get("Range"):
            type(self).seen_ranges.append(rng)
            start = int(rng.split("=")[1].split("-")[0])
        body = DATA[start:]
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(body)))
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(DATA) - 1}/{len(DATA)}")
        self.end_headers()
        if type(self).drop_first:
            type(self).drop_first = False
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.connection.shutdown(2)  # the connection dies mid-body
            return
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def http_url():
    _RangeHandler.seen_ranges, _RangeHandler.drop_first = [], True
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _RangeHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_local_paths(tmp_path):
    path = tmp_path / "w.bin"
    path.write_bytes(DATA)
    assert fetch(str(path), tmp_path / "cache", sha256=SHA) == path
    assert fetch(f"file://{path}", tmp_path / "cache") == path
    with pytest.raises(UserError, match="does not exist"):
        fetch(tmp_path / "missing.bin", tmp_path / "cache")
    with pytest.raises(UserError, match="Checksum mismatch"):
        fetch(path, tmp_path / "cache", sha256="0" * 64)
    with pytest.raises(UserError, match="'ftp://' is not supported"):
        fetch("ftp://host/x", tmp_path / "cache")


def test_http_download_resumes_with_range_and_verifies(http_url, tmp_path):
    path = fetch(f"{http_url}/weights.bin", tmp_path / "cache", sha256=SHA, progress=False)
    assert path.name == "weights.bin" and path.read_bytes() == DATA
    assert _RangeHandler.seen_ranges == [f"bytes={len(DATA) // 2}-"]
    assert fetch(f"{http_url}/weights.bin", tmp_path / "cache", sha256=SHA) == path  # cached
    assert len(_RangeHandler.seen_ranges) == 1
    with pytest.raises(UserError, match="HTTP 404"):
        fetch(f"{http_url}/missing.bin", tmp_path / "cache")


def test_http_checksum_mismatch_keeps_nothing(http_url, tmp_path):
    _RangeHandler.drop_first = False
    with pytest.raises(UserError, match="Checksum mismatch"):
        fetch(f"{http_url}/weights.bin", tmp_path / "cache", sha256="f" * 64)
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file() and p.suffix != ".lock"]


def test_s3_object_cached_verified_and_refreshed(moto, bucket, tmp_path):
    proxy = TcpProxy(moto.port).up()
    cfg = StorageConfig(endpoint_url=proxy.endpoint)
    moto.client().put_object(Bucket=bucket, Key="models/reward.pt", Body=DATA)
    uri, cache = f"s3://{bucket}/models/reward.pt", tmp_path / "cache"
    path = fetch(uri, cache, sha256=SHA, cfg=cfg)
    assert path.read_bytes() == DATA and path.name == "reward.pt"
    with pytest.raises(UserError, match="Checksum mismatch"):
        fetch(uri, tmp_path / "other-cache", sha256="0" * 64, cfg=cfg)

    proxy.down()  # offline: the verified cached copy is used
    assert fetch(uri, cache, sha256=SHA, cfg=cfg) == path
    proxy.up()
    moto.client().put_object(Bucket=bucket, Key="models/reward.pt", Body=b"new weights")
    assert fetch(uri, cache, cfg=cfg).read_bytes() == b"new weights"  # changed ETag: downloaded again
    proxy.down()


def test_s3_folder(moto, bucket, tmp_path):
    client = moto.client()
    files = {"model_index.json": b"{}", "unet/config.json": b'{"a": 1}', "unet/diffusion.safetensors": DATA}
    for rel, body in files.items():
        client.put_object(Bucket=bucket, Key=f"sdxl/{rel}", Body=body)
    path = fetch(f"s3://{bucket}/sdxl/", tmp_path / "cache", cfg=StorageConfig(endpoint_url=moto.endpoint))
    assert path.is_dir() and path.name == "sdxl"
    assert {str(p.relative_to(path)): p.read_bytes() for p in path.rglob("*") if p.is_file()} == files
    with pytest.raises(UserError, match="Nothing found"):
        fetch(f"s3://{bucket}/nothing-here", tmp_path / "cache",
              cfg=StorageConfig(endpoint_url=moto.endpoint))
