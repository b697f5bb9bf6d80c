"""One writer per run: a lease object ``<exp>/lease.json`` in the run's remote home.

A job writes the lease before it touches the run's objects and renews it every `renew_every`
seconds; another job that finds a live lease refuses to start (one line naming the holder).
A lease whose last write is older than its `ttl` (measured on the store's clock: the GET's
``Date`` minus the object's ``LastModified``) has expired and may be taken over; ``--takeover``
takes a live one over. Writes are conditional where the store supports it (``If-None-Match: *``
to create, ``If-Match: <etag>`` to renew or take over), so two contenders never both win; on a
store that rejects conditional writes the lease falls back to write-then-read-back.

The holder is a *job*: every node and every elastic restart of one job shares the holder id
(``DMDR_JOB_ID``, else torchrun's ``TORCHELASTIC_RUN_ID``, else an id rank 0 draws), so a
restarted pod of the same job continues while a different job is refused. `attempt` tells
restarts apart. A holder that finds someone else in the lease (after a takeover) has lost it:
`Lease.lost` says why, and the trainer stops uploading and exits.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from email.utils import parsedate_to_datetime
from typing import Any, Callable

import botocore.exceptions as bexc

from dmdr.errors import UserError
from dmdr.redact import redact
from dmdr.storage.client import describe_error, error_code
from dmdr.storage.uri import S3Uri

log = logging.getLogger("dmdr.storage")
LEASE_REL = "lease.json"
_UNSUPPORTED = {"NotImplemented", "InvalidArgument", "InvalidRequest", "InvalidHeader"}


def job_id(env: dict[str, str] | None = None) -> str | None:
    """The id every process of this job shares across nodes and restarts (None: draw one)."""
    env = os.environ if env is None else env
    for var in ("DMDR_JOB_ID", "TORCHELASTIC_RUN_ID"):
        value = env.get(var, "").strip()
        if value and value.lower() != "none":
            return value
    return None


def new_job_id() -> str:
    return f"job-{uuid.uuid4().hex[:12]}"


@dataclass
class LeaseBody:
    """What lease.json holds (no URLs, no credentials)."""

    holder: str
    attempt: str
    host: str
    pid: int
    restart: int
    ttl: float
    renewals: int = 0


@dataclass
class LeaseState:
    """The lease as read: its body, ETag, and age on the store's clock."""

    body: LeaseBody
    etag: str
    age: float

    @property
    def expired(self) -> bool:
        return self.age > self.body.ttl

    def describe(self) -> str:
        b = self.body
        return f"job {b.holder} (host {b.host}, pid {b.pid}, attempt {b.attempt[:8]})"


class LeaseLost(Exception):
    """Someone else holds the lease now; the message says who."""


class Lease:
    """The lease of one run (see the module doc).

    Args:
        client: boto3 S3 client.
        exp: the run's remote home.
        holder: job id (shared by all nodes and restarts of the job).
        attempt: id of this attempt of the job.
        ttl: seconds after the last renewal at which the lease expires.
        renew_every: seconds between renewals.
        conditional: use conditional writes (None: try, fall back when the store rejects them).
    """

    def __init__(self, client: Any, exp: S3Uri, holder: str, attempt: str, *, ttl: float = 120.0,
                 renew_every: float = 30.0, conditional: bool | None = None):
        self.client, self.exp = client, exp
        self.uri = exp.join(LEASE_REL)
        self.body = LeaseBody(redact(holder), attempt, socket.gethostname(), os.getpid(),
                              int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0), ttl)
        self.renew_every = renew_every
        self.conditional = conditional
        self.etag: str | None = None
        self.lost: str | None = None
        self._released = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ store access
    def read(self) -> LeaseState | None:
        """The current lease (None when there is none)."""
        try:
            reply = self.client.get_object(Bucket=self.uri.bucket, Key=self.uri.key)
        except bexc.ClientError as exc:
            if error_code(exc) in ("NoSuchKey", "404"):
                return None
            raise
        raw = reply["Body"].read()
        try:
            data = json.loads(raw)
            body = LeaseBody(**{k: data[k] for k in LeaseBody.__dataclass_fields__ if k in data})
        except (ValueError, TypeError):
            body = LeaseBody("unknown (malformed lease.json)", "?", "?", 0, 0, 0.0)
        date = reply["ResponseMetadata"].get("HTTPHeaders", {}).get("date")
        now = parsedate_to_datetime(date).timestamp() if date else time.time()
        return LeaseState(body, reply["ETag"], max(0.0, now - reply["LastModified"].timestamp()))

    def _put(self, **condition: str) -> str | None:
        """Write our body; the new ETag, or None when the condition failed (someone else won)."""
        data = json.dumps(asdict(self.body)).encode()
        kw = {"Bucket": self.uri.bucket, "Key": self.uri.key, "Body": data, "ContentType": "application/json"}
        if self.conditional is not False and condition:
            try:
                return self.client.put_object(**kw, **condition)["ETag"]
            except bexc.ClientError as exc:
                code = error_code(exc)
                if code in ("PreconditionFailed", "412", "ConditionalRequestConflict", "NoSuchKey"):
                    return None
                status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
                if code not in _UNSUPPORTED and status != 501:
                    raise
                log.info("Storage: the store rejects conditional writes (%s); the lease falls back to "
                         "write-then-check.", code or status)
                self.conditional = False
        current = self.read()  # fallback: compare, write, read back
        expected = condition.get("IfMatch")  # None: create only where there is no lease
        if (current.etag if current is not None else None) != expected:
            return None
        self.client.put_object(**kw)
        time.sleep(0.2)
        back = self.read()
        mine = back is not None and (back.body.holder, back.body.attempt) == (self.body.holder, self.body.attempt)
        return back.etag if mine else None

    # ------------------------------------------------------------------ protocol
    def acquire(self, takeover: bool = False) -> str:
        """Take the lease, or raise UserError naming the holder; returns a line saying how."""
        for _ in range(3):
            current = self.read()
            if current is None:
                self.etag = self._put(IfNoneMatch="*")
                how = "free"
            elif current.body.holder == self.body.holder:
                self.etag = self._put(IfMatch=current.etag)
                how = f"held by this job's earlier attempt {current.body.attempt[:8]}"
            elif current.expired or takeover:
                self.etag = self._put(IfMatch=current.etag)
                how = (f"taken over from {current.describe()}, "
                       + (f"expired {current.age - current.body.ttl:.0f}s ago" if current.expired
                          else f"live (renewed {current.age:.0f}s ago): --takeover"))
            else:
                raise UserError(
                    f"{self.exp} is being written by {current.describe()}, lease renewed "
                    f"{current.age:.0f}s ago (expires after {current.body.ttl:.0f}s without renewal): wait for "
                    "that job to end, or pass --takeover if it is dead, or choose another --exp-name.")
            if self.etag is not None:
                return f"lease {self.uri} {how}; this job is {self.body.holder}"
        raise UserError(f"Could not take the lease {self.uri}: other jobs keep writing it; is another "
                        "job starting on the same --exp-name? Retry once only one job runs.")

    def renew(self) -> None:
        """Write the lease again (conditional on our last ETag); LeaseLost when someone else holds it."""
        self.body.renewals += 1
        etag = self._put(IfMatch=self.etag or "")
        if etag is None:
            self._lose()
        self.etag = etag

    def check(self) -> None:
        """Read the lease; LeaseLost unless it still names this job and attempt."""
        current = self.read()
        if current is None or (current.body.holder, current.body.attempt) != (self.body.holder, self.body.attempt):
            self._lose(current)

    def _lose(self, current: LeaseState | None = None) -> None:
        current = current or self.read()
        who = current.describe() if current is not None else "nobody (lease.json was deleted)"
        self.lost = (f"this job lost the lease of {self.exp}: it is now held by {who}; stopped uploading "
                     "so the other job's checkpoints stay intact")
        raise LeaseLost(self.lost)

    def release(self) -> None:
        """Delete the lease if this job took it and still holds it (at exit: a later job need not
        wait for it to expire). Idempotent; store errors are ignored (it then expires)."""
        if self.lost is not None or self.etag is None or self._released:
            return
        self._released = True
        self.stop()
        try:
            self.check()
            self.client.delete_object(Bucket=self.uri.bucket, Key=self.uri.key)
        except (LeaseLost, bexc.BotoCoreError, bexc.ClientError):
            pass  # not ours any more, or the store is down: it expires on its own

    # ------------------------------------------------------------------ background renewal
    def start(self, on_lost: Callable[[str], None], *, write: bool = True) -> None:
        """Renew (`write`, node 0) or only check (other nodes) every `renew_every` s in a thread."""
        def loop() -> None:
            failing = False
            while not self._stop.wait(self.renew_every):
                try:
                    if write:
                        self.renew()
                    else:
                        self.check()
                except LeaseLost as exc:
                    on_lost(str(exc))
                    return
                except (bexc.BotoCoreError, bexc.ClientError) as exc:
                    if not failing:  # one line per outage; it expires after --lease-ttl without renewal
                        log.warning("Storage: could not renew the lease %s (%s); retrying.", self.uri,
                                    describe_error(exc))
                    failing = True
                    continue
                failing = False

        self._thread = threading.Thread(target=loop, name="dmdr-lease", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10.0)
