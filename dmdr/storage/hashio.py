"""Local-file helpers for transfers: hashing streams, progress bars, an inter-process lock.

The hashing files are deliberately *non-seekable*: s3transfer then reads (uploads) or writes
(downloads) strictly in order, so one pass over the bytes both transfers and hashes them.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator


class LocalReadError(Exception):
    """A local file vanished or could not be read during an upload."""


class HashingReader:
    """Read-only, in-order view of a local file that hashes what is read."""

    def __init__(self, path: Path):
        self._path = path
        try:
            self._f = open(path, "rb")
        except OSError as exc:
            raise LocalReadError(f"{path}: {exc.strerror}") from None
        self.sha = hashlib.sha256()
        self.size = 0

    def read(self, amount: int = -1) -> bytes:
        try:
            data = self._f.read(amount)
        except OSError as exc:
            raise LocalReadError(f"{self._path}: {exc.strerror}") from None
        self.sha.update(data)
        self.size += len(data)
        return data

    def close(self) -> None:
        self._f.close()


class HashingWriter:
    """Write-only, in-order file that hashes what is written; `progress(n)` per chunk."""

    def __init__(self, path: Path, progress: Callable[[int], object] | None = None, *,
                 append: bool = False, sha: Any = None):
        self._f = open(path, "ab" if append else "wb")
        self.sha = sha or hashlib.sha256()
        self.size = 0
        self._progress = progress

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.size += len(data)
        if self._progress:
            self._progress(len(data))
        return self._f.write(data)

    def close(self) -> None:
        self._f.close()


def sha256_file(path: Path, chunk: int = 8 * 1024 * 1024) -> str:
    """sha256 hex digest of a local file."""
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            sha.update(block)
    return sha.hexdigest()


def progress_bar(total: int, desc: str, progress: bool | None) -> Any:
    """A tqdm byte bar when `progress` is True, or None and stderr is a terminal; else None."""
    if progress is None:
        progress = sys.stderr.isatty()
    if not progress:
        return None
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024)


@contextmanager
def file_lock(path: Path, remove: bool = False) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created if needed) for the block: one process at a time.

    With `remove` the lock file is deleted when the block ends, so it leaves nothing behind. A
    waiter may then hold a lock on the deleted file; it notices (the path no longer names the
    file it locked) and locks the path anew, so two processes never both hold it.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        handle = open(path, "a")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
            if remove and not _names(path, handle):
                continue  # the holder before us deleted it: lock the new file instead
            try:
                yield
            finally:
                if remove:
                    path.unlink(missing_ok=True)  # while still locked: waiters see it is gone
                fcntl.flock(handle, fcntl.LOCK_UN)
            return
        finally:
            handle.close()


def _names(path: Path, handle: Any) -> bool:
    """Whether `path` still names the open file `handle`."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return False
    fst = os.fstat(handle.fileno())
    return (st.st_dev, st.st_ino) == (fst.st_dev, fst.st_ino)


def human_size(size: int) -> str:
    """A byte count for people: ``812 B``, ``1.5 KiB`` ... ``2.0 GiB`` (GiB is the largest unit)."""
    value = float(size)
    for unit in ("B", "KiB", "MiB"):
        if value < 1024:
            return f"{size} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"
