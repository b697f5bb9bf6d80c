"""Misbehaving stores on loopback for the fault tests: a throttling proxy and a silent server.

* `SlowProxy(target_port, rate)`: like `TcpProxy`, but the client's bytes reach the store at
  about `rate` bytes/s (a slow or congested store: uploads stay in flight).
* `SilentServer()`: accepts TCP connections, reads what comes and never answers (a hung
  endpoint: only read timeouts end a request).
"""
from __future__ import annotations

import socket
import threading
import time

from helpers_s3 import TcpProxy, free_port


class SlowProxy(TcpProxy):
    def __init__(self, target_port: int, rate: int = 64 * 1024):
        super().__init__(target_port)
        self.rate = rate

    def _chunk(self, upstream: bool) -> int:
        return max(1, self.rate // 20) if upstream else super()._chunk(upstream)

    def _pace(self, nbytes: int, upstream: bool) -> None:
        if upstream:  # answers from the store flow at full speed
            time.sleep(nbytes / self.rate)


class SilentServer:
    def __init__(self):
        self.port = free_port()
        self.connections = 0
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", self.port))
        self._sock.listen(64)
        self._held: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            self.connections += 1
            self._held.append(conn)
            threading.Thread(target=self._drain, args=(conn,), daemon=True).start()

    @staticmethod
    def _drain(conn: socket.socket) -> None:
        try:
            while conn.recv(1 << 16):
                pass
        except OSError:
            pass

    def close(self) -> None:
        self._sock.close()
        for conn in self._held:
            conn.close()


class ErrorServer:
    """An HTTP server answering every request with `status` (a store failing with 500s)."""

    def __init__(self, status: int = 500):
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                body = b"<Error><Code>InternalError</Code><Message>boom</Message></Error>"
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_PUT = do_HEAD = do_POST = do_DELETE = _answer

            def log_message(self, *args) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
