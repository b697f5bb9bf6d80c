"""Commands that read a run from `s3://` or write their result there, through a local copy.

`local_run()` gives a command that works on run directories (`dmdr export`, `dmdr eval`) a verified
local copy of one checkpoint of an S3 run, cached under ``<cache>/s3/<bucket>/<key>`` (a second call
for the same step downloads nothing); `upload()` puts what the command wrote locally (one file or a
folder) under an `s3://` key, the file named ``last`` after all others, so a reader that waits for
it finds the whole folder.
"""
from __future__ import annotations

from pathlib import Path

from dmdr.errors import UserError
from dmdr.storage.client import StorageConfig, make_client, storage_errors, transfer_config
from dmdr.storage.layout import RUN_FILES
from dmdr.storage.remote import download_checkpoint, download_run_files, require_latest
from dmdr.storage.uri import S3Uri


def cache_folder(uri: str, cache_dir: Path) -> Path:
    """Where `local_run` keeps its copy of the run at ``uri``."""
    parsed = S3Uri.parse(uri)
    return Path(cache_dir).expanduser() / "s3" / parsed.bucket / parsed.key


def local_run(uri: str, step: str, cache_dir: Path, cfg: StorageConfig, only: str = "generator") -> tuple[Path, str]:
    """Pull checkpoint ``step`` ('latest' or a number) of the S3 run ``uri`` (``--only`` group ``only``)
    and the run's args.json and logs; returns (the local run directory, the step pulled)."""
    if step == "latest":
        number = require_latest(uri, cfg)
    elif step.isdigit():
        number = int(step)
    else:
        raise UserError(f"--step '{step}' is not 'latest' or a step number.")
    local = cache_folder(uri, cache_dir)
    download_checkpoint(uri, number, local, only=only, cfg=cfg)
    got = download_run_files(uri, local, RUN_FILES, cfg)
    if "args.json" not in got:
        raise UserError(f"{uri}/args.json is missing: the run's configuration is needed; is {uri} the run "
                        "(s3://BUCKET/PREFIX/EXP, as `dmdr ls` lists it)?")
    return local, str(number)


def upload(local: Path, uri: str, cfg: StorageConfig, last: str | None = None) -> list[str]:
    """Upload the file ``local`` to the object ``uri``, or the folder ``local`` below the prefix ``uri``
    (its relative paths kept; the file named ``last`` goes up after the others). Returns the URIs written."""
    dest = S3Uri.parse(uri)
    if not dest.key:
        raise UserError(f"{uri} names a bucket, not a key: write s3://BUCKET/PATH")
    files = [(local, dest)] if local.is_file() else [
        (p, dest.join(p.relative_to(local).as_posix()))
        for p in sorted(local.rglob("*"), key=lambda p: (p.name == last, str(p))) if p.is_file()]
    from s3transfer.manager import TransferManager

    with storage_errors(cfg, dest), TransferManager(make_client(cfg), transfer_config(cfg)) as tm:
        for path, obj in files:  # one at a time: ``last`` must not start before the others are in
            tm.upload(str(path), obj.bucket, obj.key).result()
    return [str(obj) for _, obj in files]
