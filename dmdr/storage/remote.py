"""Read runs and checkpoints from the object store; verified, atomic checkpoint downloads."""
from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import botocore.exceptions as bexc
from s3transfer.manager import TransferManager
from s3transfer.subscribers import BaseSubscriber

from dmdr.errors import UserError
from dmdr.storage.client import StorageConfig, make_client, storage_errors, transfer_config
from dmdr.storage.hashio import file_lock, progress_bar, sha256_file
from dmdr.storage.layout import (CHECKPOINTS, LATEST_REL, FileEntry, Manifest, in_group, manifest_step,
                                 marker_rel, pulled_marker_rel, step_of)
from dmdr.storage.uri import S3Uri


@dataclass
class RunInfo:
    """A run (experiment directory) under a prefix."""

    name: str
    uri: str
    latest_step: int | None


@dataclass
class CheckpointInfo:
    """One checkpoint step seen remotely: manifest size when complete, else bytes present."""

    step: int
    size: int
    complete: bool
    latest: bool = False
    damaged: str = ""  # why its manifest cannot be used (then `complete` is False)


@dataclass
class StepObjects:
    """Objects under checkpoints/ that belong to one step."""

    keys: list[str] = field(default_factory=list)
    size: int = 0
    has_manifest: bool = False
    manifest_time: float = 0.0  # when the manifest was written (store clock, epoch seconds)


def _cfg_for(uri: str, cfg: StorageConfig | None) -> StorageConfig:
    return cfg if cfg is not None else StorageConfig(s3_uri=uri)


def iter_objects(client: Any, uri: S3Uri, sub: str = "") -> Iterator[dict]:
    """Yield the listing entry (Key, Size, LastModified, ETag) of every object below `uri`/`sub`."""
    prefix = uri.join(sub).prefix if sub else uri.prefix
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=uri.bucket, Prefix=prefix):
        yield from page.get("Contents", [])


def scan_checkpoints(client: Any, exp: S3Uri) -> dict[int, StepObjects]:
    """Group every object under ``<exp>/checkpoints/`` by checkpoint step (one listing)."""
    steps: dict[int, StepObjects] = {}
    for obj in iter_objects(client, exp, CHECKPOINTS):
        rel = exp.relative(obj["Key"])
        step = step_of(rel)
        if step is None:
            continue
        entry = steps.setdefault(step, StepObjects())
        entry.keys.append(obj["Key"])
        if manifest_step(rel) == step:
            entry.has_manifest = True
            entry.manifest_time = obj["LastModified"].timestamp()
        else:
            entry.size += int(obj["Size"])
    return steps


class DamagedObject(UserError):
    """A JSON object of the run layout (manifest, pointer) that cannot be parsed."""


def get_json(client: Any, uri: S3Uri) -> Any | None:
    """The parsed JSON object at `uri`, or None when it does not exist (DamagedObject when it is not JSON)."""
    try:
        body = client.get_object(Bucket=uri.bucket, Key=uri.key)["Body"].read()
    except bexc.ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
            return None
        raise
    try:
        return json.loads(body)
    except ValueError:  # also UnicodeDecodeError
        raise DamagedObject(f"{uri} is damaged (not JSON)") from None


def put_json(client: Any, uri: S3Uri, data: Any) -> None:
    """Write `data` as a JSON object (a single PUT: readers see all of it or none)."""
    body = data.to_json() if isinstance(data, Manifest) else json.dumps(data)
    client.put_object(Bucket=uri.bucket, Key=uri.key, Body=body.encode(), ContentType="application/json")


def delete_keys(client: Any, bucket: str, keys: list[str]) -> list[dict]:
    """Delete objects in batches of 1000; returns the per-key errors the store reported."""
    errors: list[dict] = []
    for i in range(0, len(keys), 1000):
        reply = client.delete_objects(
            Bucket=bucket, Delete={"Objects": [{"Key": k} for k in keys[i:i + 1000]], "Quiet": True})
        errors += reply.get("Errors", [])
    return errors


def delete_run(client: Any, exp: S3Uri, keep: tuple[str, ...] = ()) -> int:
    """Delete every object of the run under `exp` (but the `keep` paths) and abort its unfinished
    multipart uploads, manifests and `latest.json` first so no half-deleted checkpoint is visible.
    Returns the number of objects deleted."""
    keys = [o["Key"] for o in iter_objects(client, exp) if exp.relative(o["Key"]) not in keep]
    first = [k for k in keys if manifest_step(exp.relative(k)) is not None or exp.relative(k) == LATEST_REL]
    errors = delete_keys(client, exp.bucket, first) + delete_keys(client, exp.bucket, [k for k in keys if k not in first])
    pages = client.get_paginator("list_multipart_uploads").paginate(Bucket=exp.bucket, Prefix=exp.prefix)
    for page in pages:
        for upload in page.get("Uploads", []):
            client.abort_multipart_upload(Bucket=exp.bucket, Key=upload["Key"], UploadId=upload["UploadId"])
    if errors:
        raise UserError(f"Could not delete {len(errors)} object(s) under {exp} ({errors[0].get('Code')}): "
                        "grant s3:DeleteObject on the prefix, or choose another --exp-name.")
    return len(keys)


def read_manifest_with(client: Any, exp: S3Uri, step: int) -> Manifest | None:
    """Step N's remote manifest, or None when the checkpoint is not complete."""
    data = get_json(client, exp.join(marker_rel(step)))
    return None if data is None else Manifest.from_json(json.dumps(data), str(exp.join(marker_rel(step))))


def latest_pointer(client: Any, exp: S3Uri) -> int | None:
    """The step `latest.json` names (None when absent or unreadable)."""
    try:
        data = get_json(client, exp.join(LATEST_REL))
    except DamagedObject:  # readers fall back to the newest manifest; the next upload rewrites it
        return None
    try:
        return int(data["step"]) if data else None
    except (KeyError, TypeError, ValueError):
        return None


def latest_complete_with(client: Any, exp: S3Uri) -> int | None:
    """`latest.json`'s step when its manifest is readable, else the newest step with a readable
    manifest (a damaged one is skipped: `dmdr ls` reports it)."""
    pointed = latest_pointer(client, exp)
    if pointed is not None and _readable_manifest(client, exp, pointed):
        return pointed
    complete = sorted((s for s, objs in scan_checkpoints(client, exp).items() if objs.has_manifest and s != pointed),
                      reverse=True)
    return next((s for s in complete if _readable_manifest(client, exp, s)), None)


def _readable_manifest(client: Any, exp: S3Uri, step: int) -> bool:
    try:
        return read_manifest_with(client, exp, step) is not None
    except UserError:
        return False


def client_has(client: Any, uri: S3Uri) -> bool:
    """Whether an object exists at `uri`."""
    try:
        client.head_object(Bucket=uri.bucket, Key=uri.key)
        return True
    except bexc.ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound"):
            return False
        raise


def list_runs(prefix_uri: str, cfg: StorageConfig | None = None) -> list[RunInfo]:
    """Runs (sub-prefixes) directly under `prefix_uri`, with the step `latest.json` names."""
    uri = S3Uri.parse(prefix_uri)
    cfg = _cfg_for(prefix_uri, cfg)
    client = make_client(cfg)
    runs = []
    with storage_errors(cfg, uri):
        pages = client.get_paginator("list_objects_v2").paginate(
            Bucket=uri.bucket, Prefix=uri.prefix, Delimiter="/")
        for page in pages:
            for common in page.get("CommonPrefixes", []):
                run = S3Uri(uri.bucket, common["Prefix"].rstrip("/"))
                runs.append(RunInfo(run.name, str(run), latest_pointer(client, run)))
    return runs


def list_checkpoints(exp_uri: str, cfg: StorageConfig | None = None) -> list[CheckpointInfo]:
    """Every checkpoint step under the run, oldest first, complete or not."""
    exp = S3Uri.parse(exp_uri)
    cfg = _cfg_for(exp_uri, cfg)
    client = make_client(cfg)
    with storage_errors(cfg, exp):
        steps = scan_checkpoints(client, exp)
        latest = latest_pointer(client, exp)
        infos = []
        for step in sorted(steps):
            objs = steps[step]
            size, damaged = objs.size, ""
            if objs.has_manifest:
                try:
                    manifest = read_manifest_with(client, exp, step)
                    size = manifest.size if manifest else size
                except UserError as exc:  # not JSON, or not a manifest: the checkpoint is unusable
                    damaged = str(exc)
            complete = objs.has_manifest and not damaged
            infos.append(CheckpointInfo(step, size, complete, latest == step and complete, damaged))
    return infos


def latest_complete(exp_uri: str, cfg: StorageConfig | None = None) -> int | None:
    """The step to resume from: the complete checkpoint `latest.json` names, else the newest one."""
    exp = S3Uri.parse(exp_uri)
    cfg = _cfg_for(exp_uri, cfg)
    with storage_errors(cfg, exp):
        return latest_complete_with(make_client(cfg), exp)


def require_latest(exp_uri: str, cfg: StorageConfig | None = None) -> int:
    """`latest_complete`, or a UserError when the run has no complete checkpoint."""
    step = latest_complete(exp_uri, cfg)
    if step is None:
        raise UserError(f"{exp_uri} has no complete checkpoint yet: check the URI with `dmdr ls`.")
    return step


def split_step(uri: str) -> tuple[str, int | None]:
    """``s3://b/prefix/exp/step-N`` -> (``s3://b/prefix/exp``, N); a run URI -> (it, None)."""
    parsed = S3Uri.parse(uri)
    m = re.fullmatch(r"step-(\d+)", parsed.name)
    if m and "/" in parsed.key:
        return str(S3Uri(parsed.bucket, parsed.key.rsplit("/", 1)[0])), int(m.group(1))
    return str(parsed), None


def download_checkpoint(exp_uri: str, step: int, local_exp_dir: str | Path, only: str = "all",
                        cfg: StorageConfig | None = None, progress: bool | None = None) -> Manifest:
    """Download step N into `local_exp_dir` (the experiment directory), verified and atomic.

    Files land in a temporary folder, are checked against the manifest's sizes and sha256, then
    renamed into place; the marker is written last, so a partial pull never looks like a
    checkpoint: for ``only="all"`` the checkpoint's own completion marker, for
    ``only="generator"|"lora"`` (a subset) ``step-N.<group>.json``, which `dmdr sample`/`export`
    read and resume ignores. A lock in `local_exp_dir` (removed afterwards) makes concurrent
    callers (every rank of a node) download once: later ones find the marker and return. Returns
    the manifest of the files pulled. Progress bar only on a TTY (`progress` None), or as forced.
    """
    exp = S3Uri.parse(exp_uri)
    cfg = _cfg_for(exp_uri, cfg)
    client = make_client(cfg)
    dest = Path(local_exp_dir)
    with storage_errors(cfg, exp):
        try:
            manifest = read_manifest_with(client, exp, step)
        except UserError as exc:
            raise UserError(f"{exc}: checkpoint step {step} cannot be used; pull another step (`dmdr ls {exp}`), "
                            "or delete that manifest so the step counts as incomplete") from None
        if manifest is None:
            complete = [s for s, o in sorted(scan_checkpoints(client, exp).items()) if o.has_manifest]
            raise UserError(
                f"Checkpoint step {step} under {exp} is not complete (no manifest): pick one of the "
                f"complete steps {complete or 'none'} (see `dmdr ls {exp}`)."
            )
    files = [f for f in manifest.files if in_group(f.path, only)]
    if not files:
        raise UserError(f"Checkpoint step {step} under {exp} has no files for --only {only}: use --only all.")
    pulled = Manifest(manifest.step, files, manifest.world_size, manifest.time, manifest.num_nodes)
    marker = dest / pulled_marker_rel(step, only)
    with file_lock(dest / ".dmdr-pull.lock", remove=True):
        if _present(dest, pulled, marker):
            return pulled
        _pull_verified(client, cfg, exp, pulled, dest, marker, progress=progress)
    return pulled


def get_files(client: Any, exp: S3Uri, rels: Iterable[str], dest: Path) -> list[str]:
    """Download the small run files `rels` (args.json, logs) of `exp` that the store has into
    `dest`, each replaced atomically; returns the ones found."""
    found = []
    for rel in rels:
        obj = exp.join(rel)
        try:
            body = client.get_object(Bucket=obj.bucket, Key=obj.key)["Body"].read()
        except bexc.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                continue
            raise
        final = dest / rel
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(final.name + ".tmp")
        tmp.write_bytes(body)
        os.replace(tmp, final)
        found.append(rel)
    return found


def download_run_files(exp_uri: str, dest: str | Path, rels: Iterable[str],
                       cfg: StorageConfig | None = None) -> list[str]:
    """`get_files` with its own client; store errors become one-line UserErrors."""
    exp = S3Uri.parse(exp_uri)
    cfg = _cfg_for(exp_uri, cfg)
    with storage_errors(cfg, exp):
        return get_files(make_client(cfg), exp, rels, Path(dest))


def _present(dest: Path, manifest: Manifest, marker: Path) -> bool:
    """Whether `dest` already holds these files: their `marker`, and every file at its size."""
    try:
        local = Manifest.from_json(marker.read_text(), str(marker))
    except (FileNotFoundError, UserError):
        return False
    return {(f.path, f.sha256) for f in local.files} == {(f.path, f.sha256) for f in manifest.files} and all(
        (dest / f.path).is_file() and (dest / f.path).stat().st_size == f.size for f in manifest.files)


def _pull_verified(client: Any, cfg: StorageConfig, exp: S3Uri, manifest: Manifest, dest: Path, marker: Path, *,
                   progress: bool | None) -> None:
    step, files = manifest.step, manifest.files
    tmp = dest / f".dmdr-pull-step-{step}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    bar = progress_bar(manifest.size, f"pull step {step}", progress)
    try:
        got = _download_all(client, cfg, exp, files, tmp, bar.update if bar else None)
        for entry, (size, sha) in zip(files, got):
            if size != entry.size or (entry.sha256 and sha != entry.sha256):
                raise UserError(
                    f"Checksum mismatch for {exp.join(entry.path)}: expected {entry.size} bytes with "
                    f"sha256 {entry.sha256}, got {size} bytes with {sha}; "
                    "the remote copy is corrupt: pull another step (`dmdr ls`) or re-upload it."
                )
        marker.unlink(missing_ok=True)  # invalid while files are being replaced
        for entry in files:
            final = dest / entry.path
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp / entry.path, final)
        marker.parent.mkdir(parents=True, exist_ok=True)
        part = marker.with_suffix(".json.tmp")
        part.write_text(manifest.to_json())
        os.replace(part, marker)
    finally:
        if bar:
            bar.close()
        shutil.rmtree(tmp, ignore_errors=True)


class _Progress(BaseSubscriber):
    def __init__(self, update: Callable[[int], object]):
        self._update = update

    def on_progress(self, future: Any, bytes_transferred: int, **kwargs: Any) -> None:
        self._update(bytes_transferred)


def download_files(client: Any, cfg: StorageConfig, items: list[tuple[str, str, Path]],
                   progress: Callable[[int], object] | None = None) -> list[tuple[int, str]]:
    """Download (bucket, key, local path) items in parallel; return (size, sha256) of each.

    Files are written by s3transfer's parallel ranged GETs, then hashed from the page cache
    while later files are still downloading.
    """
    results = []
    subscribers = [_Progress(progress)] if progress else []
    with TransferManager(client, transfer_config(cfg, for_upload=False)) as tm:
        futures = []
        for bucket, key, path in items:
            path.parent.mkdir(parents=True, exist_ok=True)
            futures.append(tm.download(bucket, key, str(path), subscribers=subscribers))
        for (bucket, key, path), future in zip(items, futures):
            try:
                future.result()
            except bexc.ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                    raise MissingObject(f"s3://{bucket}/{key}") from exc
                raise
            results.append((path.stat().st_size, sha256_file(path)))
    return results


class MissingObject(UserError):
    """An object that was listed (or named in a manifest) is gone."""

    def __init__(self, uri: str):
        super().__init__(f"{uri} is gone (deleted after it was listed): retry")
        self.uri = uri


def _download_all(client: Any, cfg: StorageConfig, exp: S3Uri, files: list[FileEntry], tmp: Path,
                  progress: Callable[[int], object] | None) -> list[tuple[int, str]]:
    items = [(exp.bucket, exp.join(entry.path).key, tmp / entry.path) for entry in files]
    try:
        with storage_errors(cfg, exp):
            return download_files(client, cfg, items, progress)
    except MissingObject as exc:
        raise UserError(f"{exc.uri} is missing although the checkpoint's manifest lists it: the checkpoint was "
                        "damaged after upload; pull another step (`dmdr ls`).") from None
