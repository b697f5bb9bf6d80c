"""Object storage for runs: S3 URIs and client settings, the background `Syncer`, remote readers.

    from dmdr.storage import StorageConfig, Syncer, preflight, latest_complete, download_checkpoint
"""
from dmdr.storage.client import StorageConfig, make_client, preflight
from dmdr.storage.layout import Manifest, FileEntry, marker_rel, read_local_marker
from dmdr.storage.remote import (CheckpointInfo, RunInfo, download_checkpoint, latest_complete,
                                 list_checkpoints, list_runs)
from dmdr.storage.syncer import Syncer
from dmdr.storage.uri import S3Uri, is_s3_uri

__all__ = ["StorageConfig", "make_client", "preflight", "Manifest", "FileEntry", "marker_rel",
           "read_local_marker", "CheckpointInfo", "RunInfo", "download_checkpoint", "latest_complete",
           "list_checkpoints", "list_runs", "Syncer", "S3Uri", "is_s3_uri"]
