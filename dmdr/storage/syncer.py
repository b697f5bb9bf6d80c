"""Background uploads of one run to the object store: samples, logs and atomic checkpoints.

The `Syncer` is the only code that writes to the store. Two daemon threads do the work:

* the *files* worker uploads single files (`upload`) and changed log files (`sync_logs`, also
  every `sync_interval` seconds), each from an in-memory snapshot when small;
* the *checkpoint* worker uploads checkpoints one at a time: every file of step N (sha256
  computed while reading), then the manifest ``checkpoints/step-N.complete.json``, then the
  ``checkpoints/latest.json`` pointer, then retention. Readers ignore steps without a manifest,
  so a crash at any point leaves `latest.json` on the previous complete checkpoint.

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
import json
import logging
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable, TypeVar

import botocore.exceptions as bexc
from s3transfer.exceptions import RetriesExceededError, S3UploadFailedError
from s3transfer.manager import TransferManager

from dmdr.storage.client import MiB, StorageConfig, describe_error, make_client, transfer_config
from dmdr.storage.hashio import HashingReader, LocalReadError
from dmdr.storage.layout import (CHECKPOINTS, LATEST_REL, LOG_PATTERNS, FileEntry, Manifest, marker_rel,
                                 part_rel, read_local_marker, step_of)
from dmdr.storage.remote import StepObjects, delete_keys, get_json, put_json, scan_checkpoints
from dmdr.storage.transfers import DaemonExecutor, Health, Inflight, KnownSize, backoff, settle
from dmdr.storage.uri import S3Uri

log = logging.getLogger("dmdr.storage")
T = TypeVar("T")
_REMOTE_ERRORS = (bexc.BotoCoreError, bexc.ClientError, S3UploadFailedError, RetriesExceededError)


class _Abandon(Exception):
    """Give up this checkpoint (the reason is the message); later ones still go."""


class _Aborted(Exception):
    """`close` ran out of time: stop retrying."""


def retention_victims(steps: dict[int, StepObjects], latest: int, keep_last: int) -> list[int]:
    """Steps to delete so that `keep_last` complete checkpoints remain.

    Kept: the `keep_last` most recently completed checkpoints (by manifest time, then step)
    and always `latest`. Deleted: other complete checkpoints, and incomplete leftovers below
    `latest` (uploads killed or abandoned midway: checkpoints upload in step order, so none of
    those is still in flight). Incomplete steps above `latest` may be uploading: left alone.
    """
    if keep_last < 1:
        return []
    complete = sorted((objs.manifest_time, step) for step, objs in steps.items() if objs.has_manifest)
    keep = {step for _, step in complete[-keep_last:]} | {latest}
    return sorted(step for step, objs in steps.items()
                  if step not in keep and (objs.has_manifest or step < latest))


class Syncer:
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

    def discard_after(self, step: int | None, *, include_complete: bool = False) -> int:
        """Delete leftovers of an earlier attempt above `step` (the step this run resumed from).

        Removes incomplete checkpoints above `step` (uploads killed midway) and aborts their
        unfinished multipart uploads. With `include_complete`, newer *complete* checkpoints
        go too (manifest first) and `latest.json` moves back to `step` when that one is
        complete remotely: only for a user who asked to overwrite a newer lineage. Call once,
        on node 0, before training resumes; runs in the caller's thread; storage errors
        propagate. Returns the number of objects deleted.
        """
        start = -1 if step is None else step
        steps = scan_checkpoints(self._client, self.remote)
        doomed = sorted(s for s, objs in steps.items()
                        if s > start and (include_complete or not objs.has_manifest))
        deleted = sum(self._delete_step(s, steps[s].keys) for s in doomed)
        self._abort_multipart_after(start)
        if include_complete and any(steps[s].has_manifest for s in doomed):
            latest = self.remote.join(LATEST_REL)
            if step is not None and step in steps and steps[step].has_manifest:
                put_json(self._client, latest, {"step": step, "manifest": marker_rel(step)})
            else:
                self._client.delete_object(Bucket=latest.bucket, Key=latest.key)
        return deleted

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

    def _abort_multipart_after(self, step: int) -> None:
        """Abort unfinished multipart uploads of checkpoint files above `step` (killed uploads)."""
        prefix = self.remote.join(CHECKPOINTS).prefix
        pages = self._client.get_paginator("list_multipart_uploads").paginate(
            Bucket=self.remote.bucket, Prefix=prefix)
        for page in pages:
            for upload in page.get("Uploads", []):
                upload_step = step_of(self.remote.relative(upload["Key"]))
                if upload_step is not None and upload_step > step:
                    self._client.abort_multipart_upload(Bucket=self.remote.bucket, Key=upload["Key"],
                                                        UploadId=upload["UploadId"])

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
    def _ckpt_loop(self) -> None:
        while True:
            with self._cond:
                while not self._ckpts and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                manifest = self._ckpts.popleft()
                self._ckpt_busy = manifest.step
            try:
                self._upload_checkpoint(manifest)
                self.uploaded_checkpoints.append(manifest.step)
            except _Aborted:
                self.abandoned_checkpoints.append(manifest.step)
                return
            except _Abandon as exc:
                self.abandoned_checkpoints.append(manifest.step)
                log.warning("Checkpoint step %d was not uploaded: %s", manifest.step, exc)
            except Exception:  # noqa: BLE001 - keep the thread alive for later checkpoints
                self.abandoned_checkpoints.append(manifest.step)
                if self._abort.is_set():  # close() cancelled the transfer
                    return
                log.exception("Checkpoint step %d upload failed unexpectedly.", manifest.step)
            finally:
                with self._cond:
                    self._ckpt_busy = None
                    self._cond.notify_all()

    def _upload_checkpoint(self, local: Manifest) -> None:
        step, started = local.step, time.monotonic()
        with self._cond:
            logs_gen = self._ckpt_logs.pop(step, 0)
        what = f"uploading checkpoint step {step}"
        manifest_uri = self.remote.join(marker_rel(step))
        self._guard()
        if self.node_rank == 0:  # a re-saved step must be invisible while its files change
            self._retry(what, lambda: self._client.delete_object(Bucket=manifest_uri.bucket,
                                                                 Key=manifest_uri.key))
        entries = self._upload_checkpoint_files(local)
        if self.node_rank != 0:
            part = Manifest(step, entries, local.world_size, local.time)
            part_uri = self.remote.join(part_rel(step, self.node_rank, self.attempt))
            self._retry(what, lambda: put_json(self._client, part_uri, part))
            log.info("Checkpoint step %d: node %d's files uploaded.", step, self.node_rank)
            return
        if self.num_nodes > 1:
            entries = self._gather_parts(step, local.world_size, entries)
        self._await_logs(logs_gen)
        manifest = Manifest(step, sorted(entries, key=lambda e: e.path), local.world_size, local.time,
                            self.num_nodes)
        self._guard()  # another job may have taken the run over while the files went up
        self._retry(what, lambda: put_json(self._client, manifest_uri, manifest))
        self._retry(what, lambda: put_json(self._client, self.remote.join(LATEST_REL),
                                           {"step": step, "manifest": marker_rel(step)}))
        log.info("Checkpoint step %d uploaded to %s (%.1f MiB in %.1fs).", step, self.remote,
                 manifest.size / MiB, time.monotonic() - started)
        if self.keep_last:
            try:
                self._apply_retention(step)
            except _REMOTE_ERRORS as exc:
                log.warning("Remote retention skipped this time (%s); it runs again after the next "
                            "checkpoint.", describe_error(exc))

    def _upload_checkpoint_files(self, local: Manifest) -> list[FileEntry]:
        """Upload every file of the local marker; retry failed ones; return them with sha256."""
        done: dict[str, FileEntry] = {}
        delays = backoff(self._backoff_max)
        while True:
            if self.lost is not None:
                raise _Aborted()
            todo = [f for f in local.files if f.path not in done]
            if not todo:
                return [done[f.path] for f in local.files]
            running: list = []
            first_exc = None
            try:
                for entry in todo:
                    reader = HashingReader(self.local_root / entry.path)
                    future = self._ckpt_tm.upload(reader, self.remote.bucket, self._key(entry.path),
                                                  subscribers=[KnownSize(entry.size), self._inflight])
                    running.append((entry, reader, future))
                for entry, reader, future in running:
                    try:
                        future.result()
                    except _REMOTE_ERRORS as exc:
                        first_exc = first_exc or exc
                        continue
                    if reader.size != entry.size:
                        raise _Abandon(f"{entry.path} is {reader.size} bytes, the marker says "
                                       f"{entry.size}: the local checkpoint changed after it was saved.")
                    done[entry.path] = FileEntry(entry.path, entry.size, reader.sha.hexdigest())
            except LocalReadError as exc:
                settle([f for _, _, f in running])
                raise _Abandon(f"a local file could not be read ({exc}); was it deleted by local "
                               "retention before the upload finished?") from None
            except BaseException:
                settle([f for _, _, f in running])
                raise
            finally:
                for _, reader, _ in running:
                    reader.close()
            if first_exc is None:
                self._health.success()
                continue
            self._health.failure(f"uploading checkpoint step {local.step}", first_exc)
            with self._cond:
                newer = bool(self._ckpts)
            if newer:
                raise _Abandon("uploads are failing and a newer checkpoint is waiting; "
                               "the newer one goes first.")
            self._sleep(next(delays))

    def _gather_parts(self, step: int, world_size: int, own: list[FileEntry]) -> list[FileEntry]:
        """Node 0: wait for every other node's part manifest of `step`; merge the file lists."""
        deadline = time.monotonic() + self._node_wait
        parts: dict[int, Manifest] = {}
        while len(parts) < self.num_nodes - 1:
            for node in range(1, self.num_nodes):
                if node in parts:
                    continue
                uri = self.remote.join(part_rel(step, node, self.attempt))
                data = self._retry(f"reading node parts of step {step}", lambda: get_json(self._client, uri))
                if data is not None:
                    part = Manifest.from_json(json.dumps(data), str(uri))
                    if part.step == step and part.world_size == world_size:
                        parts[node] = part
            if len(parts) == self.num_nodes - 1:
                break
            if time.monotonic() > deadline:
                missing = sorted(set(range(1, self.num_nodes)) - set(parts))
                raise _Abandon(f"node(s) {missing} did not upload their part within {self._node_wait:.0f}s.")
            self._sleep(2.0)
        merged = {entry.path: entry for entry in own}
        for part in parts.values():
            for entry in part.files:
                merged.setdefault(entry.path, entry)
        return list(merged.values())

    def _apply_retention(self, latest_step: int) -> None:
        self._guard()
        steps = scan_checkpoints(self._client, self.remote)
        for step in retention_victims(steps, latest_step, self.keep_last or 0):
            self._delete_step(step, steps[step].keys)

    def _delete_step(self, step: int, keys: list[str]) -> int:
        """Delete a step's objects, its manifest first so it is never half-visible."""
        manifest_key = self._key(marker_rel(step))
        self._client.delete_object(Bucket=self.remote.bucket, Key=manifest_key)
        rest = [k for k in keys if k != manifest_key]
        errors = delete_keys(self._client, self.remote.bucket, rest)
        if errors:
            log.warning("Retention could not delete %d object(s) of step %d (%s).",
                        len(errors), step, errors[0].get("Code"))
        return len(rest) + (manifest_key in keys)
