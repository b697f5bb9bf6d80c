"""One writer per run: the lease protocol against a real moto S3 server, and two trainers on one
run (the second is refused naming the first; it takes over once the first is killed and its
lease expires, or at once with --takeover, after which the first stops and exits)."""
import json
import os
import signal
import subprocess
import time

import pytest

from dmdr.errors import UserError
from dmdr.storage.client import StorageConfig, make_client
from dmdr.storage.lease import Lease, LeaseLost
from dmdr.storage.remote import download_checkpoint, list_checkpoints
from dmdr.storage.uri import S3Uri
from helpers_s3 import aws_env, bucket, moto, s3_env, wait_for  # noqa: F401 (fixtures)
from helpers_train import DMDR, REPO, env, run_dmdr, tiny_args


@pytest.mark.parametrize("conditional", [None, False], ids=["conditional-writes", "read-back-fallback"])
def test_lease_protocol(moto, bucket, conditional):
    client = make_client(StorageConfig(s3_uri=f"s3://{bucket}/r", endpoint_url=moto.endpoint))
    exp = S3Uri.parse(f"s3://{bucket}/r/e")

    def lease(holder, attempt, ttl=600.0):
        return Lease(client, exp, holder, attempt, ttl=ttl, conditional=conditional)

    a = lease("job-a", "a1", ttl=2.0)
    assert "free" in a.acquire()
    with pytest.raises(UserError, match="job job-a .*--takeover"):
        lease("job-b", "b1").acquire()
    a.renew()
    a.check()

    # a restart of the SAME job continues; the earlier attempt loses the lease
    a2 = lease("job-a", "a2", ttl=2.0)
    assert "earlier attempt" in a2.acquire()
    with pytest.raises(LeaseLost, match="job job-a .*attempt a2"):
        a.renew()
    assert a.lost

    # once it expires (store clock), another job takes it over; the old holder learns on renewal
    time.sleep(3.5)
    b = lease("job-b", "b1")
    assert "expired" in b.acquire()
    with pytest.raises(LeaseLost, match="job job-b"):
        a2.renew()

    # --takeover takes a live lease
    c = lease("job-c", "c1")
    assert "--takeover" in c.acquire(takeover=True)
    with pytest.raises(LeaseLost):
        b.check()

    # release: only the holder deletes it; then the run is free
    b.release()
    assert c.read().body.holder == "job-c"
    c.release()
    assert c.read() is None


def test_two_contenders_never_both_win(moto, bucket):
    client = make_client(StorageConfig(s3_uri=f"s3://{bucket}/r", endpoint_url=moto.endpoint))
    exp = S3Uri.parse(f"s3://{bucket}/r/e")
    a, b = (Lease(client, exp, h, h) for h in ("job-a", "job-b"))
    assert a._put(IfNoneMatch="*") is not None  # both saw no lease; only the first create wins
    assert b._put(IfNoneMatch="*") is None
    assert a.read().body.holder == "job-a"


# ------------------------------------------------------------------------------ two trainers
FAST_LEASE = ["--lease-ttl", "4", "--lease-renew", "0.5"]


def _args(tmp_path, pod, moto, bucket, *extra):
    return tiny_args(tmp_path / pod, "e", tmp_path / "cache", "--checkpoint-steps", "2", "--sample-steps", "1000",
                     "--s3-uri", f"s3://{bucket}/runs", "--s3-endpoint-url", moto.endpoint, *FAST_LEASE, *extra)


def _start(tmp_path, pod, moto, bucket, job, *extra):
    cmd = DMDR + _args(tmp_path, pod, moto, bucket, "--max-train-steps", "100000", *extra)
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                            env=env(tmp_path / "cache", **aws_env({"DMDR_JOB_ID": job})), start_new_session=True)


def _committed_intact(moto, bucket, dest):
    """Every complete checkpoint in the store downloads and verifies (sizes and sha256)."""
    cfg = StorageConfig(s3_uri=f"s3://{bucket}/runs", endpoint_url=moto.endpoint)
    steps = [c.step for c in list_checkpoints(f"s3://{bucket}/runs/e", cfg) if c.complete]
    for step in steps:
        download_checkpoint(f"s3://{bucket}/runs/e", step, dest / str(step), cfg=cfg, progress=False)
    latest = json.loads(moto.client().get_object(Bucket=bucket, Key="runs/e/checkpoints/latest.json")["Body"].read())
    assert latest["step"] in steps
    return steps


@pytest.mark.slow
def test_second_job_is_refused_then_takes_over_after_kill_9(tmp_path, moto, bucket):
    first = _start(tmp_path, "pod1", moto, bucket, "job-A")
    log = tmp_path / "pod1" / "e" / "log.txt"
    try:
        wait_for(lambda: log.exists() and "Checkpoint step 2 uploaded" in log.read_text(), timeout=300,
                 what="the first job's checkpoint 2")
        # a second job (resubmitted while the first still runs) must not touch the run
        second = run_dmdr(_args(tmp_path, "pod2", moto, bucket, "--max-train-steps", "6", "--resume-ckpt", "auto"),
                          tmp_path / "cache", check=False, **aws_env({"DMDR_JOB_ID": "job-B"}))
        assert second.returncode == 2, second.stdout[-2000:] + second.stderr[-2000:]
        line = second.stderr.strip().splitlines()[-1]
        assert "being written by job job-A" in line and "--takeover" in line, line
        assert "Traceback" not in second.stderr
        assert first.poll() is None  # the first job trains on
        wait_for(lambda: "Checkpoint step 4 uploaded" in log.read_text(), timeout=300, what="checkpoint 4")
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the first job dies without releasing its lease
        first.communicate(timeout=60)
    committed = _committed_intact(moto, bucket, tmp_path / "check1")
    time.sleep(5)  # its lease expires (ttl 4 s, store clock)
    second = run_dmdr(_args(tmp_path, "pod2", moto, bucket, "--max-train-steps", str(max(committed) + 2),
                            "--resume-ckpt", "auto"), tmp_path / "cache", **aws_env({"DMDR_JOB_ID": "job-B"}))
    assert "taken over from job job-A" in second.stdout and "expired" in second.stdout
    assert f"pulled checkpoint step-{max(committed)}" in second.stdout
    after = _committed_intact(moto, bucket, tmp_path / "check2")
    assert set(committed) <= set(after) and max(after) == max(committed) + 2
    assert "Contents" not in moto.client().list_objects_v2(Bucket=bucket, Prefix="runs/e/lease.json")  # released


@pytest.mark.slow
def test_takeover_forces_and_the_old_holder_stops_writing(tmp_path, moto, bucket):
    first = _start(tmp_path, "pod1", moto, bucket, "job-A")
    second = None
    log1, log2 = tmp_path / "pod1" / "e" / "log.txt", tmp_path / "pod2" / "e" / "log.txt"
    try:
        wait_for(lambda: log1.exists() and "Checkpoint step 2 uploaded" in log1.read_text(), timeout=300,
                 what="the first job's checkpoint 2")
        second = _start(tmp_path, "pod2", moto, bucket, "job-B", "--resume-ckpt", "auto", "--takeover")
        out_first, _ = first.communicate(timeout=300)  # it loses the lease at its next renewal
        assert first.returncode == 2, out_first[-3000:]
        assert "lost the lease" in out_first.strip().splitlines()[-1] and "job job-B" in out_first
        text = wait_for(lambda: log2.exists() and "taken over from job job-A" in log2.read_text() and log2.read_text(),
                        timeout=300, what="the second job's start")  # its log continues the first one's
        assert "live (renewed" in text and "--takeover" in text
        resumed = int(text.split("resumed from", 1)[1].split("generator step ", 1)[1].split(",", 1)[0])
        wait_for(lambda: f"Checkpoint step {resumed + 2} uploaded" in log2.read_text(), timeout=300,
                 what="the new holder's next checkpoint")
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.communicate(timeout=120)
    assert second.returncode == 143
    assert max(_committed_intact(moto, bucket, tmp_path / "check")) >= resumed + 2
