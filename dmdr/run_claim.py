"""A new run never mixes with an old one in the same run directory or remote home.

`dmdr train` without ``--resume-ckpt`` into a directory (or store prefix) that already holds a
run is refused: continuing it needs ``--resume-ckpt auto``, starting over needs ``--overwrite``,
which deletes the old run's local files and remote objects first (the caller holds the run's
lease by then, so a run another live job writes is never wiped).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from dmdr.checkpoint import complete_steps

GEN_LOG = "loss_logs/loss_gen_log.jsonl"


def last_logged_step(text: str) -> int | None:
    """The ``step`` of the last complete JSONL row of a loss log (None: no row)."""
    for line in reversed(text.splitlines()):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a half-written or cut-off line
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            return row["step"]
    return None


def newest(*steps: int | None) -> int | None:
    present = [s for s in steps if s is not None]
    return max(present) if present else None


def local_progress(run_dir: Path) -> int | None:
    """The step a run in `run_dir` got to (checkpoints and loss log), None when it holds none."""
    log = run_dir / GEN_LOG
    logged = last_logged_step(log.read_text(encoding="utf-8", errors="replace")) if log.is_file() else None
    return newest(max(complete_steps(run_dir / "checkpoints"), default=None), logged)


def remote_progress(client: Any, exp: Any) -> int | None:
    """The step the run stored under `exp` got to (complete checkpoints, tail of the loss log)."""
    import botocore.exceptions as bexc

    from dmdr.storage.client import error_code
    from dmdr.storage.remote import scan_checkpoints

    complete = [s for s, objs in scan_checkpoints(client, exp).items() if objs.has_manifest]
    obj = exp.join(GEN_LOG)
    try:
        tail = client.get_object(Bucket=obj.bucket, Key=obj.key, Range="bytes=-4096")["Body"].read()
    except bexc.ClientError as exc:  # no log yet; an empty one answers 416 to a range
        if error_code(exc) not in ("NoSuchKey", "404", "InvalidRange", "416"):
            raise
        tail = b""
    return newest(max(complete, default=None), last_logged_step(tail.decode("utf-8", "replace")))


def clear_local(run_dir: Path) -> int:
    """Delete everything in `run_dir`; the number of files removed."""
    if not run_dir.is_dir():
        return 0
    count = sum(1 for p in run_dir.rglob("*") if not p.is_dir())
    for child in run_dir.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)
    return count


def refusal(where: str, step: int) -> str:
    return (f"{where} already holds a run up to step {step}: add --resume-ckpt auto to continue it, or "
            "choose another --exp-name / --overwrite to start over")
