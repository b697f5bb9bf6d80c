"""preflight fails in seconds with one clear message, and never shows credentials."""
import time

import pytest

from dmdr.errors import UserError
from dmdr.storage import StorageConfig, preflight
from helpers_s3 import SECRET_KEY, MotoServer, bucket, free_port, moto, s3_env  # noqa: F401

pytestmark = pytest.mark.slow


def _fails(cfg: StorageConfig, match: str, within: float = 15.0) -> str:
    started = time.monotonic()
    with pytest.raises(UserError, match=match) as err:
        preflight(cfg, timeout=2)
    assert time.monotonic() - started < within
    message = str(err.value)
    assert SECRET_KEY not in message and "AKIATESTDMDR" not in message
    return message


def test_preflight_passes_and_leaves_nothing_behind(moto, bucket):
    preflight(StorageConfig(s3_uri=f"s3://{bucket}/runs", endpoint_url=moto.endpoint))
    assert moto.client().list_objects_v2(Bucket=bucket).get("KeyCount") == 0


def test_unreachable_endpoint(s3_env):
    endpoint = f"http://127.0.0.1:{free_port()}"
    message = _fails(StorageConfig(s3_uri="s3://bkt-x/runs", endpoint_url=endpoint), "Cannot reach")
    assert endpoint in message and "--s3-endpoint-url" in message


def test_hanging_endpoint(s3_env):
    with MotoServer() as server:
        bucket = server.make_bucket()
        server.pause()
        try:
            _fails(StorageConfig(s3_uri=f"s3://{bucket}/r", endpoint_url=server.endpoint), "Cannot reach")
        finally:
            server.resume()


def test_missing_bucket(moto, s3_env):
    message = _fails(StorageConfig(s3_uri="s3://no-such-bucket-dmdr/runs", endpoint_url=moto.endpoint),
                     "does not exist")
    assert "no-such-bucket-dmdr" in message


def test_rejected_credentials(s3_env):
    # moto checks access keys only with IAM auth on; with zero free actions every key is unknown.
    with MotoServer(env={"INITIAL_NO_AUTH_ACTION_COUNT": "0"}) as server:
        cfg = StorageConfig(s3_uri="s3://some-bucket/runs", endpoint_url=server.endpoint)
        _fails(cfg, "rejected the credentials")


def test_no_credentials(moto, s3_env, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    _fails(StorageConfig(s3_uri="s3://some-bucket/runs", endpoint_url=moto.endpoint), "No AWS credentials")


def test_unknown_profile(s3_env):
    with pytest.raises(UserError, match="profile 'nope'"):
        preflight(StorageConfig(s3_uri="s3://some-bucket/runs", profile="nope"))
