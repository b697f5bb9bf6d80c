"""Shutdown Kubernetes can rely on, over real HTTP to moto: closing the syncer with an upload
still in flight, SIGTERM while the trainer waits for an upload, and Ctrl-C like SIGTERM."""
import json
import logging
import signal
import subprocess
import time

import pytest

from dmdr.storage import StorageConfig, Syncer
from helpers_faults import SlowProxy
from helpers_s3 import aws_env, bucket, make_checkpoint, moto, s3_env, wait_for  # noqa: F401 (fixtures)
from helpers_train import DMDR, REPO, env, tiny_args


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def test_close_at_deadline_cancels_the_upload_in_flight_and_names_it(moto, bucket, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="dmdr.storage")
    proxy = SlowProxy(moto.port, rate=50_000).up()  # a 2 MB file takes 40 s
    uri = f"s3://{bucket}/p/e"
    syncer = Syncer(tmp_path, uri, StorageConfig(s3_uri=uri, endpoint_url=proxy.endpoint))
    try:
        make_checkpoint(tmp_path, 1, {"accelerator_1/step-{s}/model.safetensors": 2_000_000})
        syncer.submit_checkpoint(1)
        time.sleep(1.0)
        started = time.monotonic()
        assert syncer.close(timeout=1) is False  # no TypeError from s3transfer's shutdown(cancel=True)
        assert time.monotonic() - started < 5
    finally:
        proxy.down()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("within 1s and dropped: checkpoint step 1" in w for w in warnings), warnings
    assert not [r for r in caplog.records if r.exc_info], "no traceback in the log"
    assert "Contents" not in moto.client().list_objects_v2(Bucket=bucket, Prefix="p/e/checkpoints/step-1.complete")


def _train(tmp_path, cache, exp, endpoint, bucket, *extra):
    cmd = DMDR + tiny_args(tmp_path, exp, cache, "--max-train-steps", "100000", "--sample-steps", "1000",
                           "--s3-uri", f"s3://{bucket}/runs", "--s3-endpoint-url", endpoint, *extra)
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env(cache, **aws_env()), cwd=REPO)


@pytest.mark.slow
def test_sigterm_while_waiting_for_an_upload_exits_143_within_seconds(tmp_path, cache, moto, bucket):
    proxy = SlowProxy(moto.port, rate=50_000).up()  # checkpoint 1 (13 MB) would take minutes
    try:
        proc = _train(tmp_path, cache, "w", proxy.endpoint, bucket, "--checkpoint-steps", "1",
                      "--s3-wait-timeout", "300", "--shutdown-grace", "5")
        log = tmp_path / "w" / "log.txt"
        wait_for(lambda: log.exists() and "step 2/" in log.read_text(), timeout=300, what="step 2")
        time.sleep(2)  # the trainer now waits for checkpoint 1's upload before saving step 2
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
        took = time.monotonic() - sent
    finally:
        proxy.down()
    print(f"SIGTERM during the upload wait: exit {proc.returncode} after {took:.1f}s")
    assert proc.returncode == 143, out[-3000:]
    assert took < 30, f"took {took:.1f}s"
    assert "Traceback" not in out
    assert "not uploaded to" in out and "checkpoint step 1" in out  # what was left, named
    assert (tmp_path / "w" / "checkpoints" / "step-2.complete.json").is_file()  # the next resume's start


@pytest.mark.slow
def test_ctrl_c_stops_like_sigterm_flushes_and_exits_130(tmp_path, cache, moto, bucket):
    proc = _train(tmp_path, cache, "c", moto.endpoint, bucket, "--checkpoint-steps", "1000")
    log = tmp_path / "c" / "log.txt"
    wait_for(lambda: log.exists() and "step 2/" in log.read_text(), timeout=300, what="step 2")
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    took = time.monotonic() - sent
    assert proc.returncode == 130, out[-3000:]
    assert took < 30, f"took {took:.1f}s"
    assert "Traceback" not in out and "cannot schedule new futures" not in out
    assert "SIGINT received: stopping at generator step" in out and "pending uploads flushed" in out
    rows = moto.client().get_object(Bucket=bucket, Key="runs/c/loss_logs/loss_gen_log.jsonl")["Body"].read()
    local = (tmp_path / "c" / "loss_logs" / "loss_gen_log.jsonl").read_text().splitlines()
    assert json.loads(rows.decode().splitlines()[-1])["step"] == json.loads(local[-1])["step"]
