"""Test helpers for object storage: a real moto S3 server, a TCP proxy, fake checkpoints.

* `MotoServer`: ``moto_server -H 127.0.0.1 -p PORT`` from the venv as a subprocess on a free
  loopback port; `pause()`/`resume()` (SIGSTOP/SIGCONT: the store hangs but keeps its buckets),
  `restart()` (same port, state lost). `shared_moto()` is one server per test process.
* `TcpProxy`: forwards a loopback port to another; `down()`/`up()` make the store refuse
  connections on the same port, and it records each HTTP request line and headers it forwards.
* Fixtures: ``moto`` (shared server), ``s3_env`` (isolated fake AWS credentials/config),
  ``bucket`` (a fresh bucket per test).
* `make_checkpoint(exp_dir, step, sizes)`: random files plus the local marker, written last.
"""
from __future__ import annotations

import atexit
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Callable

import boto3
import pytest
from botocore.config import Config

from dmdr.storage.layout import FileEntry, Manifest, marker_rel

VENV_BIN = Path(sys.executable).parent
ACCESS_KEY, SECRET_KEY, REGION = "AKIATESTDMDR0000", "dmdr-test-secret-never-printed", "us-east-1"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def listening(port: int) -> bool:
    """Whether something accepts TCP connections on 127.0.0.1:port (a rendezvous store, say)."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


def aws_env(extra: dict | None = None) -> dict:
    """A process environment with fake credentials and no user AWS config or endpoint."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY, AWS_DEFAULT_REGION=REGION,
               AWS_CONFIG_FILE=os.devnull, AWS_SHARED_CREDENTIALS_FILE=os.devnull,
               AWS_EC2_METADATA_DISABLED="true")
    env.update(extra or {})
    return env


def _wait_listening(port: int, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"moto_server exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


class MotoServer:
    """A real moto S3 server subprocess on a loopback port (see the module doc)."""

    def __init__(self, port: int | None = None, env: dict | None = None):
        self.port = port or free_port()
        self._env = env or {}
        self.proc: subprocess.Popen | None = None
        self._log = tempfile.NamedTemporaryFile(prefix="moto-", suffix=".log", delete=False)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> "MotoServer":
        self.proc = subprocess.Popen([str(VENV_BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=self._log, stderr=subprocess.STDOUT, env=aws_env(self._env))
        _wait_listening(self.port, timeout, self.proc)
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.resume()
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        """Stop and start on the same port (moto keeps state in memory: buckets are lost)."""
        self.stop()
        self.start()

    def pause(self) -> None:
        """SIGSTOP: connections still open (kernel backlog) but nothing answers."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)

    def client(self, endpoint: str | None = None, **config: object):
        """A plain boto3 client for setting up and inspecting the store in tests."""
        return boto3.client("s3", endpoint_url=endpoint or self.endpoint, region_name=REGION,
                            aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY,
                            config=Config(**config) if config else None)

    def make_bucket(self, name: str | None = None) -> str:
        name = name or f"dmdr-{uuid.uuid4().hex[:16]}"
        self.client().create_bucket(Bucket=name)
        return name

    def __enter__(self) -> "MotoServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


_SHARED: MotoServer | None = None


def shared_moto() -> MotoServer:
    """One moto server for the whole test process (started on first use, stopped at exit)."""
    global _SHARED
    if _SHARED is None or _SHARED.proc is None or _SHARED.proc.poll() is not None:
        _SHARED = MotoServer().start()
        atexit.register(_SHARED.stop)
    return _SHARED


class TcpProxy:
    """Forward 127.0.0.1:`port` to `target_port`; can refuse connections; records HTTP requests.

    `requests` holds ``(method, path, headers)`` per request sent through, in order (the
    client-to-server stream is parsed with Content-Length framing).
    """

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.port = free_port()
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._hold: Callable[[str, str], bool] | None = None
        self.held = threading.Event()  # set once a request matched hold_from
        self._down = threading.Event()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def up(self) -> "TcpProxy":
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        sock.listen(64)
        self._listener = sock
        threading.Thread(target=self._accept, args=(sock,), daemon=True).start()
        return self

    def hold_from(self, match: Callable[[str, str], bool]) -> None:
        """From the first request `match(method, path)` accepts on, nothing more reaches the
        store, that request included (a node whose network went dark): the client's bytes wait
        in the proxy until `down()`."""
        self._hold = match

    def down(self) -> None:
        """Close the listener and every open connection: clients get 'connection refused'."""
        self._down.set()
        if self._listener:
            self._listener.close()
            self._listener = None
        with self._lock:
            for conn in self._conns:
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                conn.close()
            self._conns.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, server]
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _chunk(self, upstream: bool) -> int:
        """Bytes forwarded at a time; ``upstream`` is the client-to-store direction."""
        return 1 << 16

    def _pace(self, nbytes: int, upstream: bool) -> None:
        """Called after each forwarded chunk: a throttling proxy sleeps here."""

    def _pump(self, src: socket.socket, dst: socket.socket, record: bool) -> None:
        parser = _RequestParser(self.requests) if record else None
        try:
            while data := src.recv(self._chunk(record)):
                if parser:
                    parser.feed(data)
                    if self._hold and any(self._hold(method, path) for method, path, _ in self.requests):
                        self.held.set()
                if record and self.held.is_set():
                    self._down.wait()
                    return
                dst.sendall(data)
                self._pace(len(data), record)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


class _RequestParser:
    """Splits an HTTP/1.1 client stream into requests (Content-Length bodies only)."""

    def __init__(self, sink: list):
        self._sink, self._buf, self._body_left = sink, b"", 0

    def feed(self, data: bytes) -> None:
        self._buf += data
        while True:
            if self._body_left:
                take = min(self._body_left, len(self._buf))
                self._buf, self._body_left = self._buf[take:], self._body_left - take
                if self._body_left:
                    return
            head, sep, rest = self._buf.partition(b"\r\n\r\n")
            if not sep:
                return
            lines = head.decode("latin-1").split("\r\n")
            method, path, _ = lines[0].split(" ", 2)
            fields = (line.partition(":") for line in lines[1:])
            headers = {k.strip().lower(): v.strip() for k, _, v in fields}
            self._sink.append((method, path, headers))
            self._buf, self._body_left = rest, int(headers.get("content-length", 0))


def make_checkpoint(exp_dir: Path, step: int, sizes: dict[str, int] | None = None,
                    world_size: int = 1) -> Manifest:
    """Write random checkpoint files for `step` and then its local marker; return the marker."""
    sizes = sizes or {"accelerator_1/step-{s}/model.safetensors": 3000,
                      "accelerator_2/step-{s}/optimizer.bin": 2000,
                      "lora_gen/step-{s}/adapter_model.safetensors": 500,
                      "lora_gui/step-{s}/adapter_model.safetensors": 400,
                      "torch_units/step-{s}.pt": 100}
    entries = []
    for pattern, size in sizes.items():
        rel = f"checkpoints/{pattern.format(s=step)}"
        path = exp_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            left = size
            while left:
                chunk = os.urandom(min(left, 1 << 22))
                f.write(chunk)
                left -= len(chunk)
        entries.append(FileEntry(rel, size))
    manifest = Manifest(step, entries, world_size)
    (exp_dir / marker_rel(step)).write_text(manifest.to_json())
    return manifest


def wait_for(predicate, timeout: float = 30.0, interval: float = 0.05, what: str = "condition"):
    """Poll `predicate` until it returns a truthy value; fail the test after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@pytest.fixture
def moto() -> MotoServer:
    return shared_moto()


@pytest.fixture
def s3_env(monkeypatch) -> None:
    """Fake credentials for boto3 in this process; no user AWS config, no inherited endpoint."""
    for key in list(os.environ):
        if key.startswith("AWS_"):
            monkeypatch.delenv(key)
    for key, value in aws_env().items():
        if key.startswith("AWS_"):
            monkeypatch.setenv(key, value)


@pytest.fixture
def bucket(moto: MotoServer, s3_env: None) -> str:
    return moto.make_bucket()


_KEY_RE = re.compile(r"^/[^/]+/")


def key_of(path: str) -> str:
    """The object key of a recorded path-style request path (query string dropped)."""
    return _KEY_RE.sub("", path.split("?", 1)[0], count=1)
