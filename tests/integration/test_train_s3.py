"""The trainer with object storage, over real HTTP to a moto S3 server: upload, resume from S3
in an empty directory, SIGTERM flush, store outage mid-run, kill -9 mid-upload, fast preflight failure."""
import json
import os
import signal
import subprocess
import sys
import time

import boto3
import pytest

from helpers_s3 import aws_env, moto, s3_env, bucket, wait_for  # noqa: F401 (fixtures)
from helpers_train import DMDR, REPO, env, read_jsonl, run_dmdr, tiny_args

pytestmark = pytest.mark.slow


def s3_args(moto, bucket):
    return ["--s3-uri", f"s3://{bucket}/runs", "--s3-endpoint-url", moto.endpoint]


def remote_json(moto, bucket, key):
    body = moto.client().get_object(Bucket=bucket, Key=key)["Body"].read()
    return json.loads(body)


def keys(moto, bucket, prefix):
    pages = moto.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return {o["Key"] for page in pages for o in page.get("Contents", [])}


def test_upload_then_resume_from_s3_in_an_empty_dir(tmp_path, moto, bucket):
    cache = tmp_path / "cache"
    common = ["--checkpoint-steps", "2", "--sample-steps", "2", *s3_args(moto, bucket)]
    run_dmdr(tiny_args(tmp_path / "pod1", "e", cache, "--max-train-steps", "4", *common), cache, **aws_env())
    assert remote_json(moto, bucket, "runs/e/checkpoints/latest.json")["step"] == 4
    uploaded = keys(moto, bucket, "runs/e/")
    for rel in ("args.json", "log.txt", "loss_logs/loss_gen_log.jsonl", "samples/step-000004_seed-30.png",
                "samples/step-000004_seed-30.json",
                "checkpoints/step-4.complete.json", "checkpoints/torch_units/step-4.pt"):
        assert f"runs/e/{rel}" in uploaded, rel
    manifest = remote_json(moto, bucket, "runs/e/checkpoints/step-4.complete.json")
    assert all(len(f["sha256"]) == 64 for f in manifest["files"])

    # a new pod: empty disk, same experiment, --resume-ckpt auto
    proc = run_dmdr(tiny_args(tmp_path / "pod2", "e", cache, "--max-train-steps", "6", "--resume-ckpt", "auto", *common),
                    cache, **aws_env())
    assert "pulled checkpoint step-4" in proc.stdout and "generator step 4" in proc.stdout
    rows = read_jsonl(tmp_path / "pod2" / "e" / "loss_logs" / "loss_gen_log.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]  # logs continue, no gap, no duplicate
    assert remote_json(moto, bucket, "runs/e/checkpoints/latest.json")["step"] == 6
    remote_rows = moto.client().get_object(Bucket=bucket, Key="runs/e/loss_logs/loss_gen_log.jsonl")["Body"].read()
    assert [json.loads(x)["step"] for x in remote_rows.decode().splitlines()] == [1, 2, 3, 4, 5, 6]


def test_a_node_with_the_checkpoint_but_not_the_logs_continues_the_stored_logs(tmp_path, moto, bucket):
    """After a restart the main process may land on a node that was not the main one before
    (an Indexed Job's survivor, a PyTorchJob worker kept in place): it has the checkpoint on its
    disk but none of the logs, or an older copy from when it was main. Its logs must continue
    the store's, not start over and replace them."""
    import shutil

    cache = tmp_path / "cache"
    common = ["--checkpoint-steps", "2", "--sample-steps", "100", *s3_args(moto, bucket)]
    run_dmdr(tiny_args(tmp_path / "main", "e", cache, "--max-train-steps", "4", *common), cache, **aws_env())
    other = tmp_path / "other" / "e"  # the checkpoint on its disk, no log.txt, an old loss log
    shutil.copytree(tmp_path / "main" / "e", other)
    (other / "log.txt").unlink()
    gen_log = other / "loss_logs" / "loss_gen_log.jsonl"
    gen_log.write_text("".join(gen_log.read_text().splitlines(keepends=True)[:2]))

    proc = run_dmdr(tiny_args(tmp_path / "other", "e", cache, "--max-train-steps", "6", "--resume-ckpt", "auto",
                              *common), cache, **aws_env())
    assert "pulled checkpoint" not in proc.stdout and "generator step 4" in proc.stdout  # its own copy
    assert [r["step"] for r in read_jsonl(gen_log)] == [1, 2, 3, 4, 5, 6]
    remote_rows = moto.client().get_object(Bucket=bucket, Key="runs/e/loss_logs/loss_gen_log.jsonl")["Body"].read()
    assert [json.loads(x)["step"] for x in remote_rows.decode().splitlines()] == [1, 2, 3, 4, 5, 6]
    remote_log = moto.client().get_object(Bucket=bucket, Key="runs/e/log.txt")["Body"].read().decode()
    assert remote_log.count("run directory:") == 2  # the first run's lines are still there


def test_sigterm_saves_flushes_and_exits_143(tmp_path, moto, bucket):
    cache = tmp_path / "cache"
    run_dmdr(tiny_args(tmp_path / "warm", "w", cache, "--max-train-steps", "1"), cache)  # build the tiny model once
    cmd = DMDR + tiny_args(tmp_path, "t", cache, "--max-train-steps", "100000", "--checkpoint-steps", "1000",
                           "--sample-steps", "1000", "--checkpoint-on-sigterm", *s3_args(moto, bucket))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env(cache, **aws_env()), cwd=REPO)
    log = tmp_path / "t" / "log.txt"
    wait_for(lambda: log.exists() and "step 3/" in log.read_text(), timeout=300, what="step 3")
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, out[-3000:]
    assert "SIGTERM received: stopping at generator step" in out
    assert "pending uploads flushed" in out
    step = remote_json(moto, bucket, "runs/t/checkpoints/latest.json")["step"]
    assert step >= 3
    remote_rows = moto.client().get_object(Bucket=bucket, Key="runs/t/loss_logs/loss_gen_log.jsonl")["Body"].read()
    assert json.loads(remote_rows.decode().splitlines()[-1])["step"] == step  # logs flushed up to the stop


def test_store_outage_mid_run_catches_up(tmp_path, moto, bucket):
    cache = tmp_path / "cache"
    run_dmdr(tiny_args(tmp_path / "warm", "w", cache, "--max-train-steps", "1"), cache)
    cmd = DMDR + tiny_args(tmp_path, "o", cache, "--max-train-steps", "8", "--checkpoint-steps", "2",
                           "--sample-steps", "2", "--sync-interval", "1", "--s3-wait-timeout", "3",
                           *s3_args(moto, bucket))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env(cache, **aws_env()), cwd=REPO)
    log = tmp_path / "o" / "log.txt"
    try:
        wait_for(lambda: log.exists() and "syncing" in log.read_text(), timeout=300, what="training start")
        moto.pause()  # the store hangs (SIGSTOP) while training goes on
        wait_for(lambda: "step 6/8" in log.read_text(), timeout=300, what="training past the outage")
    finally:
        moto.resume()
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    assert "saving locally and training on" in out
    assert remote_json(moto, bucket, "runs/o/checkpoints/latest.json")["step"] == 8
    rows = moto.client().get_object(Bucket=bucket, Key="runs/o/loss_logs/loss_gen_log.jsonl")["Body"].read()
    assert [json.loads(x)["step"] for x in rows.decode().splitlines()] == list(range(1, 9))


def test_unreachable_store_fails_fast(tmp_path):
    cache = tmp_path / "cache"
    t0 = time.monotonic()
    proc = run_dmdr(tiny_args(tmp_path, "u", cache, "--s3-uri", "s3://nobucket/x", "--s3-endpoint-url",
                              "http://127.0.0.1:9"), cache, check=False, **aws_env({"AWS_SECRET_ACCESS_KEY": "SECRET-XYZ"}))
    assert proc.returncode == 2
    assert time.monotonic() - t0 < 60
    assert "127.0.0.1:9" in proc.stderr and "Traceback" not in proc.stderr
    assert "SECRET-XYZ" not in proc.stdout + proc.stderr
    assert not (tmp_path / "u" / "checkpoints").exists()


def test_kill_9_mid_upload_resumes_from_the_previous_complete_checkpoint(tmp_path, moto, bucket):
    cache = tmp_path / "cache"
    run_dmdr(tiny_args(tmp_path / "warm", "w", cache, "--max-train-steps", "1"), cache)
    cmd = DMDR + tiny_args(tmp_path / "pod1", "k", cache, "--max-train-steps", "100000", "--checkpoint-steps", "2",
                           "--sample-steps", "1000", "--s3-wait-timeout", "1", *s3_args(moto, bucket))
    same_job = {"DMDR_JOB_ID": "job-k"}  # the pod is restarted by its job: it may take the run's lease back
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=env(cache, **aws_env(same_job)), cwd=REPO, start_new_session=True)
    log = tmp_path / "pod1" / "k" / "log.txt"
    try:
        wait_for(lambda: log.exists() and "Checkpoint step 2 uploaded" in log.read_text(), timeout=300,
                 what="checkpoint 2 uploaded")
        moto.pause()  # the next upload hangs mid-way ...
        wait_for(lambda: (tmp_path / "pod1" / "k" / "checkpoints" / "step-4.complete.json").exists(),
                 timeout=300, what="checkpoint 4 saved locally")
        time.sleep(1)
        os.killpg(proc.pid, signal.SIGKILL)  # ... and the trainer dies with it in flight
        proc.wait(timeout=60)
    finally:
        moto.resume()
    assert remote_json(moto, bucket, "runs/k/checkpoints/latest.json")["step"] == 2
    # a new pod with an empty disk resumes from the last COMPLETE checkpoint in the store
    proc2 = run_dmdr(tiny_args(tmp_path / "pod2", "k", cache, "--max-train-steps", "5", "--checkpoint-steps", "2",
                               "--sample-steps", "1000", "--resume-ckpt", "auto", *s3_args(moto, bucket)),
                     cache, **aws_env(same_job))
    assert "pulled checkpoint step-2" in proc2.stdout and "generator step 2," in proc2.stdout
    assert remote_json(moto, bucket, "runs/k/checkpoints/latest.json")["step"] == 5
