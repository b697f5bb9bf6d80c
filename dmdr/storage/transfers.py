"""Transfer plumbing for the Syncer: retry pacing, outage tracking, and transfers that can be
abandoned at a deadline.

s3transfer runs requests on `concurrent.futures` threads, which the interpreter joins at exit:
one request stuck on a slow or silent store then holds the process (SIGTERM, end of run) until
its socket times out, minutes later. `DaemonExecutor` runs them on daemon threads instead, and
`Inflight` tracks the transfers still running so that `cancel_all` can stop them (an upload in
progress stops at its next body read) without `TransferManager.shutdown(cancel=True)`, which
fails with ``TypeError: 'str' object is not callable`` in s3transfer 0.19 (it shifts its
arguments).
"""
from __future__ import annotations

import logging
import queue
import random
import threading
import time
from concurrent.futures import CancelledError, Future
from typing import Any, Callable, Iterator

from s3transfer.subscribers import BaseSubscriber

from dmdr.storage.client import describe_error

log = logging.getLogger("dmdr.storage")


def backoff(cap: float, base: float = 0.5) -> Iterator[float]:
    attempt = 0
    while True:
        yield min(cap, base * 2 ** attempt) * (0.5 + random.random() / 2)
        attempt += 1


class Health:
    """Outage tracking: one warning when uploads start failing, one line when they recover."""

    def __init__(self, on_change: Callable[[], None]):
        self._lock = threading.Lock()
        self._down_since: float | None = None
        self._on_change = on_change

    @property
    def down(self) -> bool:
        return self._down_since is not None

    def failure(self, what: str, exc: BaseException) -> None:
        with self._lock:
            first = self._down_since is None
            if first:
                self._down_since = time.monotonic()
        if first:
            log.warning("S3 upload failed while %s (%s); training continues and uploads retry with "
                        "backoff until the store is back.", what, describe_error(exc))
            self._on_change()
        else:
            log.debug("S3 still failing while %s: %s", what, describe_error(exc))

    def success(self) -> None:
        with self._lock:
            since, self._down_since = self._down_since, None
        if since is not None:
            log.warning("S3 reachable again after %.0fs; catching up on pending uploads.",
                        time.monotonic() - since)
            self._on_change()


class KnownSize(BaseSubscriber):
    """Tell s3transfer the size up front so a non-seekable source needs no probing read."""

    def __init__(self, size: int):
        self._size = size

    def on_queued(self, future: Any, **kwargs: Any) -> None:
        future.meta.provide_transfer_size(self._size)


def settle(futures: list) -> None:
    """Cancel and wait for transfers we no longer want."""
    for fut in futures:
        fut.cancel()
    for fut in futures:
        try:
            fut.result()
        except Exception:  # noqa: BLE001 - cancelled or failed: either way, done
            pass


class Inflight(BaseSubscriber):
    """Subscribe to every transfer: knows which are running, and stops them on `cancel_all`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._futures: set = set()
        self.cancelled = threading.Event()

    def on_queued(self, future: Any, **kwargs: Any) -> None:
        with self._lock:
            self._futures.add(future)

    def on_progress(self, future: Any, bytes_transferred: int, **kwargs: Any) -> None:
        if self.cancelled.is_set():  # called while the request body is sent: ends the request
            raise CancelledError("dmdr: upload abandoned at the close deadline")

    def on_done(self, future: Any, **kwargs: Any) -> None:
        with self._lock:
            self._futures.discard(future)

    def cancel_all(self) -> int:
        """Cancel every running transfer; returns how many there were."""
        self.cancelled.set()
        with self._lock:
            futures = list(self._futures)
        for fut in futures:
            fut.cancel()
        return len(futures)


class DaemonExecutor:
    """The `concurrent.futures` executor interface s3transfer needs, on daemon threads."""

    def __init__(self, max_workers: int | None = None):
        self._max = max_workers or 8
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._idle = 0

    def submit(self, fn: Callable, *args: Any, **kwargs: Any) -> Future:
        future: Future = Future()
        with self._lock:
            if self._idle == 0 and len(self._threads) < self._max:
                thread = threading.Thread(target=self._work, name="dmdr-transfer", daemon=True)
                self._threads.append(thread)
                thread.start()
            else:
                self._idle -= 1
        self._queue.put((future, fn, args, kwargs))
        return future

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            future, fn, args, kwargs = item
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args, **kwargs))
                except BaseException as exc:  # noqa: BLE001 - handed to whoever waits on it
                    future.set_exception(exc)
            with self._lock:
                self._idle += 1

    def shutdown(self, wait: bool = True) -> None:
        for _ in self._threads:
            self._queue.put(None)
        if wait:
            for thread in self._threads:
                thread.join()
