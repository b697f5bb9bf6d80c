"""Object storage for runs: S3 URIs and client settings, the background `Syncer`, remote readers.

    from dmdr.storage import StorageConfig, Syncer, preflight, latest_complete, download_checkpoint

Names load on first use (PEP 562), so importing a submodule such as ``dmdr.storage.uri`` or
``dmdr.storage.cli`` does not pull in boto3 (``dmdr --help`` stays fast).
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "dmdr.storage.client": ("StorageConfig", "make_client", "preflight"),
    "dmdr.storage.layout": ("Manifest", "FileEntry", "marker_rel", "read_local_marker"),
    "dmdr.storage.remote": ("CheckpointInfo", "RunInfo", "download_checkpoint", "latest_complete",
                            "list_checkpoints", "list_runs"),
    "dmdr.storage.syncer": ("Syncer",),
    "dmdr.storage.uri": ("S3Uri", "is_s3_uri"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = list(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'dmdr.storage' has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name]), name)
