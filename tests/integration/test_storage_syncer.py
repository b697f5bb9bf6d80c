"""Syncer against a real moto S3 server over HTTP: commit protocol, logs, retention."""
import hashlib
import json
import time

import pytest

from dmdr.errors import UserError
from dmdr.storage import StorageConfig, Syncer, download_checkpoint, latest_complete, list_checkpoints
from dmdr.storage.client import MiB
from helpers_s3 import TcpProxy, bucket, key_of, make_checkpoint, moto, s3_env, wait_for  # noqa: F401

pytestmark = pytest.mark.slow


def _get(moto, bucket, key) -> bytes:
    return moto.client().get_object(Bucket=bucket, Key=key)["Body"].read()


def _keys(moto, bucket, prefix="") -> set[str]:
    pages = moto.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return {o["Key"] for page in pages for o in page.get("Contents", [])}


def test_commit_protocol_files_then_manifest_then_latest(moto, bucket, tmp_path):
    proxy = TcpProxy(moto.port).up()
    exp, uri = tmp_path / "exp", f"s3://{bucket}/runs/exp"
    cfg = StorageConfig(s3_uri=uri, endpoint_url=proxy.endpoint, part_size_mb=5, max_concurrency=4)
    local = make_checkpoint(exp, 100, {"accelerator_1/step-{s}/model.safetensors": 11 * MiB + 7,
                                       "accelerator_2/step-{s}/optimizer.bin": 4000,
                                       "torch_units/step-{s}.pt": 0})
    with Syncer(exp, uri, cfg, sync_interval=0) as syncer:
        syncer.submit_checkpoint(100)
        assert syncer.wait_checkpoint(timeout=120)
    assert syncer.uploaded_checkpoints == [100]

    writes = [(method, key_of(path)) for method, path, _ in proxy.requests if method in ("PUT", "POST")]
    manifest_at = writes.index(("PUT", "runs/exp/checkpoints/step-100.complete.json"))
    latest_at = writes.index(("PUT", "runs/exp/checkpoints/latest.json"))
    file_writes = [i for i, (_, key) in enumerate(writes)
                   if "/step-100/" in key or key.endswith("step-100.pt")]
    assert len(file_writes) >= 3 + 3  # multipart: create, >= 3 parts, complete; plus the small files
    assert max(file_writes) < manifest_at < latest_at == len(writes) - 1

    manifest = json.loads(_get(moto, bucket, "runs/exp/checkpoints/step-100.complete.json"))
    assert manifest["step"] == 100 and manifest["world_size"] == 1
    for entry, want in zip(manifest["files"], sorted(local.files, key=lambda f: f.path)):
        data = (exp / want.path).read_bytes()
        assert (entry["path"], entry["size"]) == (want.path, want.size)
        assert entry["sha256"] == hashlib.sha256(data).hexdigest()
        assert _get(moto, bucket, f"runs/exp/{want.path}") == data
    assert json.loads(_get(moto, bucket, "runs/exp/checkpoints/latest.json")) == {
        "step": 100, "manifest": "checkpoints/step-100.complete.json"}


def test_checkpoint_without_manifest_is_invisible(moto, bucket, tmp_path):
    exp, uri = tmp_path / "exp", f"s3://{bucket}/p/exp"
    cfg = StorageConfig(s3_uri=uri, endpoint_url=moto.endpoint)
    with Syncer(exp, uri, cfg, sync_interval=0) as syncer:
        for step in (1, 2):
            make_checkpoint(exp, step)
            syncer.submit_checkpoint(step)
            assert syncer.wait_checkpoint(timeout=60)
    assert latest_complete(uri, cfg) == 2
    moto.client().delete_object(Bucket=bucket, Key="p/exp/checkpoints/step-2.complete.json")

    assert latest_complete(uri, cfg) == 1  # latest.json still says 2, but 2 has no manifest
    infos = {i.step: i for i in list_checkpoints(uri, cfg)}
    assert infos[1].complete and not infos[2].complete and not infos[2].latest
    with pytest.raises(UserError, match=r"step 2 .* not complete .*\[1\]"):
        download_checkpoint(uri, 2, tmp_path / "pulled", cfg=cfg)


def test_retention_keeps_last_k_and_cleans_killed_uploads(moto, bucket, tmp_path):
    exp, uri = tmp_path / "exp", f"s3://{bucket}/p/exp"
    cfg = StorageConfig(s3_uri=uri, endpoint_url=moto.endpoint)
    moto.client().put_object(Bucket=bucket, Key="p/exp/checkpoints/torch_units/step-15.pt", Body=b"killed")
    with Syncer(exp, uri, cfg, keep_last=2, sync_interval=0) as syncer:
        for step in (10, 20, 30, 40):
            make_checkpoint(exp, step)
            syncer.submit_checkpoint(step)
            assert syncer.wait_checkpoint(timeout=60)
    infos = list_checkpoints(uri, cfg)
    assert [(i.step, i.complete, i.latest) for i in infos] == [(30, True, False), (40, True, True)]
    assert all("step-10" not in k and "step-15" not in k for k in _keys(moto, bucket))


def test_logs_and_samples_sync_on_change_and_periodically(moto, bucket, tmp_path):
    proxy = TcpProxy(moto.port).up()
    exp, uri = tmp_path / "exp", f"s3://{bucket}/p/exp"
    (exp / "loss_logs").mkdir(parents=True)
    (exp / "samples").mkdir()
    (exp / "args.json").write_text('{"lr": 1e-5}')
    (exp / "log.txt").write_text("step 1\n")
    (exp / "loss_logs" / "loss_gen_log.jsonl").write_text('{"step": 1}\n')
    (exp / "samples" / "step-1.png").write_bytes(b"\x89PNG fake")
    (exp / "scratch.tmp").write_text("not a log")
    cfg = StorageConfig(s3_uri=uri, endpoint_url=proxy.endpoint)
    syncer = Syncer(exp, uri, cfg, sync_interval=0.3)
    try:
        syncer.upload("samples/step-1.png")
        assert syncer.flush(timeout=30)
        assert _keys(moto, bucket) == {"p/exp/args.json", "p/exp/log.txt",
                                       "p/exp/loss_logs/loss_gen_log.jsonl", "p/exp/samples/step-1.png"}
        with open(exp / "log.txt", "a") as f:
            f.write("step 2\n")
        wait_for(lambda: _get(moto, bucket, "p/exp/log.txt") == b"step 1\nstep 2\n", 20, 0.1, "periodic sync")
        assert syncer.flush(timeout=30)
    finally:
        assert syncer.close(timeout=30)
    puts = [key_of(p) for m, p, _ in proxy.requests if m == "PUT"]
    assert puts.count("p/exp/args.json") == 1  # unchanged files are not uploaded again
    assert puts.count("p/exp/log.txt") == 2


def test_discard_after_removes_leftovers_of_an_abandoned_attempt(moto, bucket, tmp_path):
    exp, uri = tmp_path / "exp", f"s3://{bucket}/p/exp"
    cfg = StorageConfig(s3_uri=uri, endpoint_url=moto.endpoint)
    client = moto.client()
    with Syncer(exp, uri, cfg, sync_interval=0) as syncer:
        for step in (1, 2, 3):
            make_checkpoint(exp, step)
            syncer.submit_checkpoint(step)
            assert syncer.wait_checkpoint(timeout=60)
        client.put_object(Bucket=bucket, Key="p/exp/checkpoints/torch_units/step-4.pt", Body=b"killed")
        big = "p/exp/checkpoints/accelerator_1/step-4/model.safetensors"
        client.create_multipart_upload(Bucket=bucket, Key=big)

        assert syncer.discard_after(1) == 1  # default: only the incomplete step 4
        assert [i.step for i in list_checkpoints(uri, cfg)] == [1, 2, 3]
        assert client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
        assert latest_complete(uri, cfg) == 3

        assert syncer.discard_after(1, include_complete=True) > 0  # the user overwrites 2 and 3
    assert [i.step for i in list_checkpoints(uri, cfg)] == [1]
    assert json.loads(_get(moto, bucket, "p/exp/checkpoints/latest.json"))["step"] == 1


def test_submit_without_local_marker_is_a_user_error(moto, bucket, tmp_path):
    uri = f"s3://{bucket}/p/exp"
    cfg = StorageConfig(s3_uri=uri, endpoint_url=moto.endpoint)
    with Syncer(tmp_path, uri, cfg, sync_interval=0) as syncer:
        with pytest.raises(UserError, match="no completion marker"):
            syncer.submit_checkpoint(7)
    assert syncer.close() is True  # closing twice is fine
    with pytest.raises(RuntimeError, match="closed"):
        syncer.upload("log.txt")


def test_a_checkpoint_is_published_only_after_the_logs_synced_before_it(moto, bucket, tmp_path):
    """A pod that resumes on an empty disk (worker-0 rescheduled: kubeflow/trainer#1638) takes the
    loss logs from the store and the checkpoint from its manifest. Logs synced before a checkpoint
    was submitted must therefore be in the store before that checkpoint's manifest is: otherwise
    the resumed run misses the rows between the store's log and the checkpoint. A large log and a
    small checkpoint make the manifest win that race when nothing orders the two."""
    exp, uri = tmp_path / "exp", f"s3://{bucket}/runs/exp"
    cfg = StorageConfig(s3_uri=uri, endpoint_url=moto.endpoint, part_size_mb=5)
    log = exp / "loss_logs" / "loss_gen_log.jsonl"
    log.parent.mkdir(parents=True)
    log.write_bytes(b'{"step": 1}\n' * (3 * MiB))  # 36 MiB of rows, written before the save
    make_checkpoint(exp, 1)
    with Syncer(exp, uri, cfg, sync_interval=0) as syncer:
        syncer.sync_logs()
        syncer.submit_checkpoint(1)
        assert syncer.wait_checkpoint(timeout=120)
        listed = moto.client().list_objects_v2(Bucket=bucket, Prefix="runs/exp/loss_logs/").get("Contents", [])
        sizes = {o["Key"]: o["Size"] for o in listed}
    assert sizes.get("runs/exp/loss_logs/loss_gen_log.jsonl") == log.stat().st_size, \
        "checkpoint step 1 was published before the logs synced ahead of it were in the store"
