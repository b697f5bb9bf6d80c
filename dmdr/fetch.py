"""One way in for every input file or folder: local paths, ``s3://`` and ``http(s)://``.

``fetch(uri_or_path, cache_dir, sha256=None) -> Path`` returns a local path. Remote inputs are
downloaded into ``cache_dir/<hash of the URI>/<name>``, verified (size, and sha256 when given),
and placed atomically; a ``.complete.json`` written last makes the entry usable, so a killed
download is never mistaken for a finished one. A per-entry file lock lets every rank of a node
call `fetch` at once while only one downloads. HTTP downloads resume with Range requests and
retry with backoff; ``s3://`` URIs may name one object or a prefix (a model folder), and a cached
S3 entry is re-downloaded when the remote ETags change.

New schemes (e.g. ``hf://``) plug in with `register_scheme`.
"""
from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import shutil
import socket
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable
from urllib.parse import unquote, urlparse

import botocore.exceptions as bexc

from dmdr.errors import UserError
from dmdr.storage.client import StorageConfig, make_client, storage_errors
from dmdr.storage.hashio import HashingWriter, file_lock, progress_bar, sha256_file
from dmdr.storage.remote import download_files, iter_objects
from dmdr.storage.uri import S3Uri

log = logging.getLogger("dmdr.fetch")
COMPLETE = ".complete.json"


@dataclass
class FetchContext:
    """What a scheme handler gets besides the URI.

    Attributes:
        entry: the cache directory for this URI (exists, locked by us).
        sha256: expected sha256 of a single file, or None.
        cfg: S3 settings for ``s3://`` inputs.
        progress: progress bar on (True), off (False) or only on a TTY (None).
        attempts: tries for retryable network errors.
    """

    entry: Path
    sha256: str | None
    cfg: StorageConfig
    progress: bool | None
    attempts: int = 6

    def cached(self) -> dict | None:
        """The completion record of this entry, when there is one."""
        try:
            return json.loads((self.entry / COMPLETE).read_text())
        except (FileNotFoundError, ValueError):
            return None

    def commit(self, name: str, version: str | None) -> Path:
        """Record the entry as complete (written last) and return its data path."""
        record = {"name": name, "version": version, "sha256": self.sha256, "time": time.time()}
        tmp = self.entry / (COMPLETE + ".tmp")
        tmp.write_text(json.dumps(record))
        os.replace(tmp, self.entry / COMPLETE)
        return self.entry / name


Handler = Callable[[str, FetchContext], Path]
_SCHEMES: dict[str, Handler] = {}


def register_scheme(scheme: str, handler: Handler) -> None:
    """Make `fetch` handle ``scheme://`` URIs with `handler(uri, ctx) -> Path`."""
    _SCHEMES[scheme] = handler


def fetch(uri_or_path: str | Path, cache_dir: str | Path, sha256: str | None = None, *,
          cfg: StorageConfig | None = None, progress: bool | None = None) -> Path:
    """A local path for `uri_or_path`, downloading and verifying remote inputs into `cache_dir`."""
    text = str(uri_or_path)
    scheme = urlparse(text).scheme if "://" in text else ""
    if scheme in ("", "file"):
        return _local(Path(unquote(urlparse(text).path)) if scheme else Path(text), sha256)
    handler = _SCHEMES.get(scheme)
    if handler is None:
        raise UserError(f"Cannot fetch '{text}': the scheme '{scheme}://' is not supported; use a local "
                        f"path or one of {', '.join(s + '://' for s in sorted(_SCHEMES))}.")
    entry = Path(cache_dir) / hashlib.sha256(text.encode()).hexdigest()[:24]
    entry.mkdir(parents=True, exist_ok=True)
    with file_lock(entry.parent / f"{entry.name}.lock"):
        ctx = FetchContext(entry, sha256.lower() if sha256 else None, cfg or StorageConfig(), progress)
        return handler(text, ctx)


def _local(path: Path, sha256: str | None) -> Path:
    if not path.exists():
        raise UserError(f"Input '{path}' does not exist: fix the path (or use an s3:// or https:// URI).")
    if sha256 and path.is_file():
        _verify(path, sha256, str(path))
    return path


def _verify(path: Path, expected: str, where: str, actual: str | None = None) -> None:
    actual = actual or sha256_file(path)
    if actual != expected.lower():
        raise UserError(f"Checksum mismatch for {where}: expected sha256 {expected}, got {actual}; the "
                        "source changed or is corrupt: fix the source or the expected sha256.")


def _fresh_tmp(ctx: FetchContext) -> Path:
    tmp = ctx.entry / ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


# ---------------------------------------------------------------------------------- s3://
def _s3_listing(client: Any, uri: S3Uri) -> tuple[str, list[dict]]:
    """("object", [head]) or ("prefix", [entries]) for what `uri` names."""
    try:
        head = client.head_object(Bucket=uri.bucket, Key=uri.key)
        return "object", [{"Key": uri.key, "Size": head["ContentLength"], "ETag": head["ETag"]}]
    except bexc.ClientError as exc:
        if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchKey", "NotFound"):
            raise
    objects = [o for o in iter_objects(client, uri) if not o["Key"].endswith("/")]
    if not objects:
        raise UserError(f"Nothing found at {uri}: check the bucket and key (no object and no objects "
                        "below that prefix).")
    return "prefix", objects


def _version(objects: list[dict]) -> str:
    text = "\n".join(f"{o['Key']} {o['Size']} {o['ETag']}" for o in sorted(objects, key=lambda o: o["Key"]))
    return hashlib.sha256(text.encode()).hexdigest()


def _fetch_s3(uri_text: str, ctx: FetchContext) -> Path:
    uri = S3Uri.parse(uri_text)
    if not uri.key:
        raise UserError(f"'{uri_text}' names a whole bucket: point at an object or a folder inside it.")
    client = make_client(ctx.cfg)
    record = ctx.cached()
    try:
        with storage_errors(ctx.cfg, uri):
            kind, objects = _s3_listing(client, uri)
    except UserError:
        if record is None:
            raise
        log.warning("Cannot check %s for changes; using the cached copy.", uri)
        return ctx.entry / record["name"]
    if record and record.get("version") == _version(objects) and record.get("sha256") == ctx.sha256:
        return ctx.entry / record["name"]
    if kind == "prefix" and ctx.sha256:
        raise UserError(f"{uri} is a folder; a sha256 can only pin a single file: drop it or point at "
                        "a file.")
    (ctx.entry / COMPLETE).unlink(missing_ok=True)
    tmp = _fresh_tmp(ctx)
    name = uri.name
    bar = progress_bar(sum(int(o["Size"]) for o in objects), f"fetch {uri.name}", ctx.progress)
    try:
        items = [(uri.bucket, obj["Key"],
                  tmp / (name if kind == "object" else f"{name}/{uri.relative(obj['Key'])}")) for obj in objects]
        with storage_errors(ctx.cfg, uri):
            got = download_files(client, ctx.cfg, items, bar.update if bar else None)
        for obj, (size, sha) in zip(objects, got):
            if size != int(obj["Size"]):
                raise UserError(f"s3://{uri.bucket}/{obj['Key']} changed during the download; retry.")
        if ctx.sha256:
            _verify(tmp / name, ctx.sha256, uri_text, got[0][1])
        shutil.rmtree(ctx.entry / name, ignore_errors=True)
        os.replace(tmp / name, ctx.entry / name)
        return ctx.commit(name, _version(objects))
    finally:
        if bar:
            bar.close()
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------- http(s)://
_RETRYABLE = (urllib.error.URLError, http.client.HTTPException, ConnectionError, socket.timeout, TimeoutError)


class _HttpStatus(Exception):
    def __init__(self, code: int):
        super().__init__(code)
        self.code = code


def _fetch_http(url: str, ctx: FetchContext) -> Path:
    record = ctx.cached()
    if record and record.get("sha256") == ctx.sha256:
        return ctx.entry / record["name"]
    name = Path(unquote(urlparse(url).path)).name or "download"
    part = ctx.entry / f"{name}.part"
    delay = 1.0
    for attempt in range(1, ctx.attempts + 1):
        try:
            sha = _http_download(url, part, ctx.progress)
            break
        except _HttpStatus as exc:
            if exc.code in (401, 403, 404, 410):
                raise UserError(f"Cannot download {url}: the server answered HTTP {exc.code}; check the URL "
                                "and that it is public (or copy the file to s3://).") from None
            error: BaseException = exc
        except _RETRYABLE as exc:
            error = exc
        if attempt == ctx.attempts:
            raise UserError(f"Cannot download {url} after {attempt} tries ({error}): check the network "
                            "and the URL; the partial download is kept and resumes next time.") from None
        log.warning("Download of %s interrupted (%s); resuming in %.0fs.", url, error, delay)
        time.sleep(delay)
        delay = min(delay * 2, 30.0)
    if ctx.sha256:
        try:
            _verify(part, ctx.sha256, url, sha)
        except UserError:
            part.unlink(missing_ok=True)
            raise
    os.replace(part, ctx.entry / name)
    return ctx.commit(name, None)


def _http_download(url: str, part: Path, progress: bool | None) -> str:
    """Download (or continue) `url` into `part`; returns the sha256 of the whole file."""
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"User-Agent": "dmdr-fetch"})
    if have:
        request.add_header("Range", f"bytes={have}-")
    try:
        response = urllib.request.urlopen(request, timeout=30)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # nothing left to fetch or a stale part: start over
            part.unlink()
        raise _HttpStatus(exc.code) from None
    with response:
        resumed = response.status == 206
        if not resumed:
            have = 0
        length = response.headers.get("Content-Length")
        total = have + int(length) if length is not None else None
        sha = hashlib.sha256()
        if resumed:
            with open(part, "rb") as f:
                while block := f.read(8 << 20):
                    sha.update(block)
        bar = progress_bar(total or 0, f"fetch {part.stem}", progress)
        if bar:
            bar.update(have)
        writer = HashingWriter(part, bar.update if bar else None, append=resumed, sha=sha)
        try:
            while block := response.read(1 << 20):
                writer.write(block)
        finally:
            writer.close()
            if bar:
                bar.close()
    size = part.stat().st_size
    if total is not None and size != total:
        raise http.client.IncompleteRead(b"", total - size)
    return sha.hexdigest()


register_scheme("s3", _fetch_s3)
register_scheme("http", _fetch_http)
register_scheme("https", _fetch_http)
