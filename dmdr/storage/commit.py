"""The checkpoint side of the `Syncer`: upload step N, publish it, apply retention.

`CheckpointWorker` holds the methods of the Syncer's checkpoint thread; it is a mixin and uses
the state the Syncer sets up (client, transfer manager, condition, health, fence). One checkpoint
at a time: every file of step N (sha256 computed while reading), node parts gathered on node 0
(multi-node), the logs synced before the checkpoint awaited, then the manifest
``checkpoints/step-N.complete.json``, then ``checkpoints/latest.json``, then retention.
"""
from __future__ import annotations

import json
import logging
import time

import botocore.exceptions as bexc
from s3transfer.exceptions import RetriesExceededError, S3UploadFailedError

from dmdr.storage.client import MiB, describe_error
from dmdr.storage.hashio import HashingReader, LocalReadError
from dmdr.storage.layout import CHECKPOINTS, LATEST_REL, FileEntry, Manifest, marker_rel, part_rel, step_of
from dmdr.storage.remote import StepObjects, delete_keys, get_json, put_json, scan_checkpoints
from dmdr.storage.transfers import KnownSize, backoff, settle

log = logging.getLogger("dmdr.storage")
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


class CheckpointWorker:
    """The Syncer's checkpoint thread and remote clean-up (a mixin: see the module doc)."""

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
