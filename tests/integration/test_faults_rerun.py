"""A rerun never mixes two runs: `dmdr train` without --resume-ckpt into a run directory (or a
store prefix) that already holds a run is refused with one line; --overwrite clears both first,
but never a run that another live job holds (its lease)."""
import json

import pytest

from dmdr.checkpoint import complete_steps
from dmdr.storage.client import StorageConfig, make_client
from dmdr.storage.lease import Lease
from dmdr.storage.uri import S3Uri
from helpers_s3 import aws_env, bucket, moto, s3_env  # noqa: F401 (fixtures)
from helpers_train import read_jsonl, run_dmdr, tiny_args

pytestmark = pytest.mark.slow
STEPS = ["--checkpoint-steps", "2", "--sample-steps", "2"]


def _last_line(proc):
    return (proc.stderr.strip().splitlines() or [""])[-1]


def test_rerun_in_a_local_run_dir_is_refused_and_overwrite_starts_over(tmp_path):
    cache, run = tmp_path / "cache", tmp_path / "e"
    run_dmdr(tiny_args(tmp_path, "e", cache, "--max-train-steps", "2", *STEPS), cache)
    again = run_dmdr(tiny_args(tmp_path, "e", cache, "--max-train-steps", "2", *STEPS), cache, check=False)
    assert again.returncode == 2
    assert _last_line(again) == (f"dmdr train: error: {run} already holds a run up to step 2: add --resume-ckpt auto "
                                 "to continue it, or choose another --exp-name / --overwrite to start over")
    assert [r["step"] for r in read_jsonl(run / "loss_logs" / "loss_gen_log.jsonl")] == [1, 2]  # untouched

    over = run_dmdr(tiny_args(tmp_path, "e", cache, "--max-train-steps", "1", "--checkpoint-steps", "1",
                              "--overwrite"), cache)
    assert "--overwrite: removed the earlier run (up to step 2)" in over.stdout
    assert complete_steps(run / "checkpoints") == [1]  # `--resume-ckpt latest` can only find the new run
    assert not (run / "samples" / "step-000002.png").exists()
    assert [r["step"] for r in read_jsonl(run / "loss_logs" / "loss_gen_log.jsonl")] == [1]


def _keys(moto, bucket, prefix="runs/e/"):
    pages = moto.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return {o["Key"] for page in pages for o in page.get("Contents", [])}


def test_rerun_against_a_stored_run_is_refused_and_overwrite_respects_the_lease(tmp_path, moto, bucket):
    cache = tmp_path / "cache"
    s3 = ["--s3-uri", f"s3://{bucket}/runs", "--s3-endpoint-url", moto.endpoint]
    run_dmdr(tiny_args(tmp_path / "pod1", "e", cache, "--max-train-steps", "2", *STEPS, *s3), cache, **aws_env())
    old = _keys(moto, bucket)
    assert "runs/e/checkpoints/step-2.complete.json" in old

    # a new pod with an empty disk: the store still holds the run
    fresh = run_dmdr(tiny_args(tmp_path / "pod2", "e", cache, "--max-train-steps", "1", *s3), cache, check=False,
                     **aws_env())
    assert fresh.returncode == 2, fresh.stderr[-2000:]
    assert f"s3://{bucket}/runs/e already holds a run up to step 2: add --resume-ckpt auto" in _last_line(fresh)
    assert _keys(moto, bucket) == old

    # --overwrite while another job holds the run's lease: refused, nothing deleted
    other = Lease(make_client(StorageConfig(s3_uri=f"s3://{bucket}/runs", endpoint_url=moto.endpoint)),
                  S3Uri.parse(f"s3://{bucket}/runs/e"), "job-other", "x", ttl=600)
    other.acquire()
    args = tiny_args(tmp_path / "pod2", "e", cache, "--max-train-steps", "1", "--checkpoint-steps", "1",
                     "--overwrite", *s3)
    held = run_dmdr(args, cache, check=False, **aws_env())
    assert held.returncode == 2 and "being written by job job-other" in _last_line(held)
    assert _keys(moto, bucket) == old | {"runs/e/lease.json"}
    other.release()

    over = run_dmdr(args, cache, **aws_env())
    assert "--overwrite: removed the earlier run (up to step 2)" in over.stdout
    left = _keys(moto, bucket)
    assert not any("step-2" in k for k in left), sorted(left)
    latest = json.loads(moto.client().get_object(Bucket=bucket, Key="runs/e/checkpoints/latest.json")["Body"].read())
    assert latest["step"] == 1
    rows = moto.client().get_object(Bucket=bucket, Key="runs/e/loss_logs/loss_gen_log.jsonl")["Body"].read()
    assert [json.loads(x)["step"] for x in rows.decode().splitlines()] == [1]
