"""kill -9 in the middle of a checkpoint upload: latest.json stays on the previous complete one."""
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from dmdr.storage import StorageConfig, Syncer, download_checkpoint, latest_complete, list_checkpoints
from helpers_s3 import aws_env, bucket, make_checkpoint, moto, s3_env, wait_for  # noqa: F401

pytestmark = pytest.mark.slow
TESTS = Path(__file__).resolve().parents[1]

CHILD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    sys.path.insert(0, sys.argv[4])
    from helpers_s3 import make_checkpoint
    from dmdr.storage import StorageConfig, Syncer
    from dmdr.storage.client import MiB
    exp, uri, endpoint = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    # A bandwidth cap makes the 40 MiB file take seconds, so the kill lands mid-upload.
    cfg = StorageConfig(s3_uri=uri, endpoint_url=endpoint, part_size_mb=5, max_concurrency=2,
                        max_bandwidth=6 * MiB)
    syncer = Syncer(exp, uri, cfg, sync_interval=0)
    make_checkpoint(exp, 1)
    syncer.submit_checkpoint(1)
    assert syncer.wait_checkpoint(timeout=60)
    make_checkpoint(exp, 2, {"accelerator_1/step-{s}/model.safetensors": 40 * MiB,
                             "torch_units/step-{s}.pt": 1000})
    syncer.submit_checkpoint(2)
    print("submitted 2", flush=True)
    time.sleep(600)
""")


def test_kill_9_mid_upload_leaves_latest_on_previous_checkpoint(moto, bucket, tmp_path):
    exp, uri = tmp_path / "exp", f"s3://{bucket}/p/exp"
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    child = subprocess.Popen([sys.executable, str(script), str(exp), uri, moto.endpoint, str(TESTS)],
                             stdout=subprocess.PIPE, text=True, env=aws_env())
    try:
        assert child.stdout.readline().strip() == "submitted 2"
        client = moto.client()
        big = "p/exp/checkpoints/accelerator_1/step-2/model.safetensors"

        def parts_uploaded() -> int:
            uploads = client.list_multipart_uploads(Bucket=bucket, Prefix=big).get("Uploads", [])
            if not uploads:
                return 0
            parts = client.list_parts(Bucket=bucket, Key=big, UploadId=uploads[0]["UploadId"])
            return len(parts.get("Parts", []))

        wait_for(parts_uploaded, timeout=60, what="the first part of step 2")
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=10)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == -signal.SIGKILL

    latest = json.loads(client.get_object(Bucket=bucket, Key="p/exp/checkpoints/latest.json")["Body"].read())
    assert latest["step"] == 1
    cfg = StorageConfig(s3_uri=uri, endpoint_url=moto.endpoint)
    assert latest_complete(uri, cfg) == 1
    assert [(i.step, i.complete) for i in list_checkpoints(uri, cfg)][0] == (1, True)
    assert all(not i.complete for i in list_checkpoints(uri, cfg) if i.step == 2)

    pulled = tmp_path / "resumed"
    manifest = download_checkpoint(uri, latest_complete(uri, cfg), pulled, cfg=cfg)
    for entry in manifest.files:
        assert (pulled / entry.path).read_bytes() == (exp / entry.path).read_bytes()

    # The resumed run drops the debris of the killed attempt before it trains on.
    with Syncer(pulled, uri, cfg, sync_interval=0) as syncer:
        syncer.discard_after(1)
    assert client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    assert [i.step for i in list_checkpoints(uri, cfg)] == [1]
