"""The store goes away mid-run: training is not blocked, one warning, and everything catches up."""
import json
import logging
import time

import pytest

from dmdr.storage import StorageConfig, Syncer, latest_complete
from helpers_s3 import MotoServer, TcpProxy, make_checkpoint, s3_env  # noqa: F401

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("outage", ["paused", "refusing"])
def test_outage_then_recovery_uploads_everything(outage, s3_env, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="dmdr.storage")
    with MotoServer() as server:
        bucket = server.make_bucket()
        proxy = TcpProxy(server.port).up()
        endpoint = proxy.endpoint if outage == "refusing" else server.endpoint
        exp, uri = tmp_path / "exp", f"s3://{bucket}/p/exp"
        cfg = StorageConfig(s3_uri=uri, endpoint_url=endpoint, retries=1, connect_timeout=1, read_timeout=1)
        (exp / "samples").mkdir(parents=True)
        (exp / "log.txt").write_text("step 1\n")
        syncer = Syncer(exp, uri, cfg, sync_interval=0.5, backoff_max=0.5)
        try:
            make_checkpoint(exp, 1)
            syncer.submit_checkpoint(1)
            assert syncer.wait_checkpoint(timeout=60)

            server.pause() if outage == "paused" else proxy.down()
            (exp / "samples" / "step-2.png").write_bytes(b"png during outage")
            syncer.upload("samples/step-2.png")
            with open(exp / "log.txt", "a") as f:
                f.write("step 2\n")
            make_checkpoint(exp, 2)
            syncer.submit_checkpoint(2)
            time.sleep(3)  # uploads fail and back off meanwhile
            started = time.monotonic()
            assert not syncer.wait_checkpoint(timeout=30)  # store down: training is not held up
            assert time.monotonic() - started < 1.0
            make_checkpoint(exp, 3)
            syncer.submit_checkpoint(3)
            with open(exp / "log.txt", "a") as f:
                f.write("step 3\n")
            time.sleep(1)

            server.resume() if outage == "paused" else proxy.up()
            assert syncer.flush(timeout=90)
        finally:
            syncer.close(timeout=10)
            proxy.down()
        client = server.client()
        read = lambda key: client.get_object(Bucket=bucket, Key=f"p/exp/{key}")["Body"].read()  # noqa: E731
        assert read("log.txt") == b"step 1\nstep 2\nstep 3\n"
        assert read("samples/step-2.png") == b"png during outage"
        assert json.loads(read("checkpoints/latest.json"))["step"] == 3
        assert latest_complete(uri, StorageConfig(s3_uri=uri, endpoint_url=server.endpoint)) == 3
        assert 3 in syncer.uploaded_checkpoints and set(syncer.abandoned_checkpoints) <= {2}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert sum("S3 upload failed" in w for w in warnings) == 1, warnings
    assert any("S3 reachable again" in w for w in warnings)
    assert "dmdr-test-secret" not in caplog.text
