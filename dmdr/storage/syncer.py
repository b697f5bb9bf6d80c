"""Background uploads of one run to the object store: samples, logs and atomic checkpoints.

The `Syncer` is the only code that writes to the store. Two daemon threads do the work:

* the *files* worker uploads single files (`upload`) and changed log files (`sync_logs`, also
  every `sync_interval` seconds), each from an in-memory snapshot when small;
* the *checkpoint* worker uploads checkpoints one at a time: every file of step N (sha256
  computed while reading), then the manifest ``checkpoints/step-N.complete.json``, then the
  ``checkpoints/latest.json`` pointer, then retention. Readers ignore steps without a manifest,
  so a crash at any point leaves `latest.json` on the previous complete checkpoint. Its methods
  live in `dmdr.storage.commit`.

Multi-node runs: every node runs a Syncer on its own files (its local marker lists them). A node
with ``node_rank > 0`` uploads its files and then a part manifest
``checkpoints/step-N.parts/<attempt>/node-K.json``; node 0 uploads its files, waits until every
other node's part manifest of the same attempt exists, merges them into the one manifest, and
only then moves `latest.json`. `attempt` is a string every node of one training attempt shares
and no other attempt uses (e.g. a uuid broadcast from rank 0 at start), so parts left by a
killed attempt that saved the same step are never merged into a new checkpoint.

Store outages: every operation retries with capped exponential backoff, forever (until
`close` gives up); one warning when an outage starts and one line when it ends. Training never
waits on the network except in `wait_checkpoint` while the store is healthy. While uploads are
failing, at most one checkpoint waits behind the one in flight: a newer submit replaces it, and
an in-flight checkpoint that keeps failing yields to a waiting newer one, so the newest
checkpoint is what gets uploaded when the store returns.

One writer: with a `fence` (the run's lease check, see `dmdr.storage.lease`), the checkpoint
worker asks it before it publishes a manifest or deletes anything; when it answers that another
job holds the run now (or `stop_writing` is called), every upload stops for good.
"""
from __future__ import annotations

import io
import logging
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable, TypeVar

from s3transfer.manager import TransferManager

from dmdr.storage.client import MiB, StorageConfig, make_client, transfer_config
from dmdr.storage.commit import _REMOTE_ERRORS, CheckpointWorker, _Aborted
from dmdr.storage.layout import LOG_PATTERNS, Manifest, read_local_marker
from dmdr.storage.transfers import DaemonExecutor, Health, Inflight, backoff
from dmdr.storage.uri import S3Uri

log = logging.getLogger("dmdr.storage")
T = TypeVar("T")


class Syncer(CheckpointWorker):
    """Uploads one run directory to ``remote_root`` in the background (see the module doc).

    Args:
        local_root: the local experiment directory (``<output_dir>/<exp_name>``).
        remote_root: its remote home, ``s3://bucket/prefix/<exp_name>``.
        cfg: store and transfer settings.
        keep_last: keep this many complete checkpoints remotely (None: all); the one
            `latest.json` names is never deleted. Node 0 applies it.
        sync_interval: seconds between automatic log syncs (0: only on request).
        node_rank, num_nodes: this node's index and the node count (multi-node protocol).
        attempt: id shared by all nodes of this training attempt (multi-node protocol).
        log_patterns: globs (relative to `local_root`) that `sync_logs` uploads when changed.
        backoff_max: longest pause between retries, seconds.
        node_wait_timeout: how long node 0 waits for other nodes' parts of a checkpoint.
        max_pending: single-file uploads that may wait; beyond that the oldest is dropped.
        fence: returns None while this job may write the run, else why not (the lease check).
    """

    def __init__(self, local_root: Path | str, remote_root: str, cfg: StorageConfig, *,
                 keep_last: int | None = None, sync_interval: float = 60.0, node_rank: int = 0,
                 num_nodes: int = 1, attempt: str = "0", log_patterns: tuple[str, ...] = LOG_PATTERNS,
                 backoff_max: float = 60.0, node_wait_timeout: float = 3600.0, max_pending: int = 10_000,
                 fence: Callable[[], str | None] | None = None):
        self.local_root = Path(local_root)
        self.remote = S3Uri.parse(remote_root)
        self.keep_last = keep_last
        self.node_rank, self.num_nodes, self.attempt = node_rank, num_nodes, attempt
        self.uploaded_checkpoints: list[int] = []
        self.abandoned_checkpoints: list[int] = []
        self._cfg = cfg
        self._interval = sync_interval
        self._patterns = log_patterns
        self._backoff_max = backoff_max
        self._node_wait = node_wait_timeout
        self._max_pending = max_pending
        self._small_limit = cfg.part_size_mb * MiB
        self._client = make_client(cfg)
        self._inflight = Inflight()  # every transfer, so close() can stop them at its deadline
        self._files_tm = TransferManager(self._client, transfer_config(cfg), executor_cls=DaemonExecutor)
        self._ckpt_tm = TransferManager(self._client, transfer_config(cfg), executor_cls=DaemonExecutor)
        self._cond = threading.Condition()
        self._pending: dict[str, int] = {}      # rel path -> request number
        self._requests = 0
        self._sigs: dict[str, tuple[int, int]] = {}  # rel path -> (size, mtime_ns) last uploaded
        self._logs_due = False
        self._logs_asked = 0   # sync_logs() calls so far
        self._logs_synced = 0  # the last of those whose changed logs are all in the store
        self._ckpt_logs: dict[int, int] = {}  # step -> sync_logs() calls before it was submitted
        self._files_busy = False
        self._ckpts: deque[Manifest] = deque()
        self._ckpt_busy: int | None = None
        self._stopping = False
        self._closed: bool | None = None  # close()'s result once closed
        self._abort = threading.Event()
        self._fence = fence
        self.lost: str | None = None  # why this job may no longer write the run
        self._health = Health(self._notify)
        self._threads = [threading.Thread(target=self._files_loop, name="dmdr-sync-files", daemon=True),
                         threading.Thread(target=self._ckpt_loop, name="dmdr-sync-ckpt", daemon=True)]
        for thread in self._threads:
            thread.start()

    # ------------------------------------------------------------------ public interface
    def upload(self, rel_path: str) -> None:
        """Queue one file (relative to `local_root`, e.g. a sample PNG) for upload.

        Never blocks: past `max_pending` waiting files the oldest one is dropped with a warning.
        """
        rel = Path(rel_path).as_posix()
        with self._cond:
            self._check_open()
            if self.lost:
                return
            if len(self._pending) >= self._max_pending and rel not in self._pending:
                oldest = next(iter(self._pending))
                del self._pending[oldest]
                log.warning("Storage: %d uploads are waiting (store down?); %s will not be uploaded.",
                            self._max_pending, oldest)
            self._requests += 1
            self._pending[rel] = self._requests
            self._cond.notify_all()

    def sync_logs(self) -> None:
        """Queue an upload of every log/args file changed since its last upload. A checkpoint
        submitted after this call is published (manifest, latest.json) only once these logs are
        in the store, so a resume that takes both from the store never finds rows missing."""
        with self._cond:
            self._logs_due = True
            self._logs_asked += 1
            self._cond.notify_all()

    def submit_checkpoint(self, step: int) -> None:
        """Queue step N for upload; its local completion marker must already exist."""
        manifest = read_local_marker(self.local_root, step)
        with self._cond:
            self._check_open()
            if self.lost:
                return
            while self._ckpts:
                old = self._ckpts.popleft()
                self._ckpt_logs.pop(old.step, None)
                self.abandoned_checkpoints.append(old.step)
                log.warning("Checkpoint step %d was not uploaded: step %d replaces it while the store "
                            "is slow or down.", old.step, step)
            self._ckpts.append(manifest)
            self._ckpt_logs[step] = self._logs_asked
            self._cond.notify_all()

    def wait_checkpoint(self, timeout: float | None = None, stop: Callable[[], bool] | None = None) -> bool:
        """Block until submitted checkpoints are uploaded; True when they are.

        Returns False at once while the store is failing (training goes on), after `timeout`,
        or within a second of `stop()` turning true (a SIGTERM must not wait on the network).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._ckpts or self._ckpt_busy is not None:
                if self._health.down or self.lost:
                    return False
                if not self._wait(deadline, stop):
                    return False
            return True

    def flush(self, timeout: float | None = None, stop: Callable[[], bool] | None = None) -> bool:
        """Sync logs, then wait for every queued upload; True when all are done in time
        (False as soon as `stop()` is true)."""
        self.sync_logs()
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._idle():
                if self.lost or not self._wait(deadline, stop):
                    return False
            return True

    def close(self, timeout: float | None = 60.0) -> bool:
        """Flush within `timeout`, then stop the workers; True when nothing was left behind.

        At the deadline, transfers still running are cancelled (not waited for) and one warning
        names what was not uploaded; the process can exit at once.
        """
        if self._closed is not None:
            return self._closed
        done = not self.lost and self.flush(timeout)
        if self.lost:
            self._abort.set()
        elif done:
            log.info("Storage: all uploads to %s are done.", self.remote)
        else:
            log.warning("Storage: not uploaded to %s within %ss and dropped: %s.",
                        self.remote, timeout, self.unflushed())
            self._abort.set()
            self._inflight.cancel_all()
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(timeout=10.0 if done else 1.0)
        if done:
            self._files_tm.shutdown()
            self._ckpt_tm.shutdown()
        self._closed = done
        return done

    def unflushed(self) -> str:
        """What is still waiting for the store, in words (for the close warning)."""
        with self._cond:
            steps = ([self._ckpt_busy] if self._ckpt_busy is not None else []) + [m.step for m in self._ckpts]
            files = sorted(self._pending)
            logs = self._logs_due or self._files_busy
        parts = [f"checkpoint step {', '.join(map(str, steps))}"] if steps else []
        if files:
            parts.append(f"{len(files)} file(s) ({', '.join(files[:3])}{', ...' if len(files) > 3 else ''})")
        elif logs:
            parts.append("the latest log lines")
        return "; ".join(parts) or "nothing"

    def stop_writing(self, reason: str) -> None:
        """Stop every upload for good: this job no longer holds the run (`reason` says why)."""
        with self._cond:
            if self.lost is None:
                self.lost = reason
                log.error("Storage: %s", reason)
            self._abort.set()
            self._cond.notify_all()
        self._inflight.cancel_all()  # not one more byte over the other job's objects

    def _guard(self) -> None:
        """Before publishing or deleting: ask the fence; abort when this job lost the run."""
        if self._fence is not None and self.lost is None:
            reason = self._retry("checking the run's lease", self._fence)
            if reason:
                self.stop_writing(reason)
        if self.lost is not None:
            raise _Aborted()

    def __enter__(self) -> "Syncer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ shared helpers
    def _notify(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _wait(self, deadline: float | None, stop: Callable[[], bool] | None = None) -> bool:
        """Wait on the condition (held by the caller); False when `deadline` has passed or
        `stop()` is true (polled every half second)."""
        if stop is not None and stop():
            return False
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            return False
        if stop is not None:
            remaining = 0.5 if remaining is None else min(remaining, 0.5)
        self._cond.wait(remaining)
        return True

    def _check_open(self) -> None:
        if self._stopping:
            raise RuntimeError(f"the Syncer for {self.remote} is closed")

    def _idle(self) -> bool:
        return not (self._pending or self._logs_due or self._files_busy or self._ckpts
                    or self._ckpt_busy is not None)

    def _sleep(self, seconds: float) -> None:
        if self._abort.wait(seconds):
            raise _Aborted()

    def _retry(self, what: str, fn: Callable[[], T]) -> T:
        """Run `fn` until it succeeds, backing off while the store fails."""
        delays = backoff(self._backoff_max)
        while True:
            if self.lost is not None:
                raise _Aborted()
            try:
                result = fn()
            except _REMOTE_ERRORS as exc:
                self._health.failure(what, exc)
                self._sleep(next(delays))
                continue
            self._health.success()
            return result

    def _key(self, rel: str) -> str:
        return self.remote.join(rel).key

    # ------------------------------------------------------------------ files worker
    def _files_loop(self) -> None:
        next_logs = time.monotonic() + self._interval if self._interval > 0 else None
        while True:
            with self._cond:
                while not (self._pending or self._logs_due or self._stopping):
                    if next_logs is not None and time.monotonic() >= next_logs:
                        self._logs_due = True
                        break
                    self._cond.wait(None if next_logs is None else max(0.0, next_logs - time.monotonic()))
                if self._stopping:
                    return
                scan_logs, self._logs_due = self._logs_due, False
                logs_gen = self._logs_asked if scan_logs else None
                self._files_busy = True
            batch: dict[str, int] = {}
            try:
                if scan_logs:
                    if next_logs is not None:
                        next_logs = time.monotonic() + self._interval
                    self._queue_changed_logs()
                with self._cond:
                    batch = dict(self._pending)
                self._upload_files(batch)
                self._logs_done(logs_gen)
            except _Aborted:
                return
            except Exception:  # noqa: BLE001 - a bug must not kill the uploads thread silently
                if self._abort.is_set():  # close() cancelled the transfer
                    return
                log.exception("Storage: uploading files to %s failed unexpectedly.", self.remote)
                with self._cond:
                    for rel in batch:
                        self._pending.pop(rel, None)
                self._logs_done(logs_gen)  # reported above; checkpoints must not wait on it forever
            finally:
                with self._cond:
                    self._files_busy = False
                    self._cond.notify_all()

    def _logs_done(self, gen: int | None) -> None:
        if gen is not None:
            with self._cond:
                self._logs_synced = max(self._logs_synced, gen)
                self._cond.notify_all()

    def _await_logs(self, gen: int) -> None:
        """Block until the logs of sync_logs() call number `gen` are in the store (the files
        worker retries them while the store is down, as it does the checkpoint)."""
        with self._cond:
            while self._logs_synced < gen:
                if self._abort.is_set() or self._stopping or self.lost is not None:
                    raise _Aborted()
                self._cond.wait(1.0)

    def _queue_changed_logs(self) -> None:
        changed = []
        for path in sorted({p for pattern in self._patterns for p in self.local_root.glob(pattern)}):
            rel = path.relative_to(self.local_root).as_posix()
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            if path.is_file() and self._sigs.get(rel) != (st.st_size, st.st_mtime_ns):
                changed.append(rel)
        with self._cond:
            for rel in changed:
                self._requests += 1
                self._pending[rel] = self._requests

    def _start_file(self, rel: str) -> tuple[Any, tuple[int, int]] | None:
        """Start one upload; a small file is read into memory first so it is one snapshot."""
        path = self.local_root / rel
        try:
            st = path.stat()
            source: Any = str(path)
            if st.st_size <= self._small_limit:
                source = io.BytesIO(path.read_bytes())
        except (FileNotFoundError, IsADirectoryError):
            log.warning("Storage: %s vanished before upload; skipped.", path)
            return None
        future = self._files_tm.upload(source, self.remote.bucket, self._key(rel), subscribers=[self._inflight])
        return future, (st.st_size, st.st_mtime_ns)

    def _upload_files(self, batch: dict[str, int]) -> None:
        delays = backoff(self._backoff_max)
        todo = dict(batch)
        while todo:
            if self.lost is not None:
                raise _Aborted()
            started = {rel: self._start_file(rel) for rel in todo}
            failed, first_exc = {}, None
            for rel, item in started.items():
                if item is not None:
                    future, sig = item
                    try:
                        future.result()
                        self._sigs[rel] = sig
                    except _REMOTE_ERRORS as exc:
                        failed[rel], first_exc = todo[rel], first_exc or exc
                        continue
                with self._cond:
                    if self._pending.get(rel) == todo[rel]:  # not re-queued meanwhile
                        del self._pending[rel]
                        self._cond.notify_all()
            if first_exc is None:
                self._health.success()
                return
            self._health.failure("uploading logs and samples", first_exc)
            self._sleep(next(delays))
            todo = failed

    # ------------------------------------------------------------------ checkpoint worker
