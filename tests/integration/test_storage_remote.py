"""`dmdr ls` / `dmdr pull` round trip against moto, and a corrupted object is caught."""
import argparse
import os

import pytest

from dmdr.errors import UserError
from dmdr.storage import StorageConfig, Syncer, download_checkpoint, read_local_marker
from dmdr.storage.cli import add_parsers, run_ls, run_pull
from helpers_s3 import bucket, make_checkpoint, moto, s3_env  # noqa: F401

pytestmark = pytest.mark.slow


def _cli(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="dmdr")
    add_parsers(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(list(argv))


@pytest.fixture
def run(moto, bucket, tmp_path):
    """A run with complete checkpoints 5 and 10 uploaded to s3://bucket/runs/exp1."""
    exp, uri = tmp_path / "exp1", f"s3://{bucket}/runs/exp1"
    with Syncer(exp, uri, StorageConfig(s3_uri=uri, endpoint_url=moto.endpoint), sync_interval=0) as syncer:
        for step in (5, 10):
            make_checkpoint(exp, step)
            syncer.submit_checkpoint(step)
            assert syncer.wait_checkpoint(timeout=60)
    killed = "runs/exp1/checkpoints/torch_units/step-15.pt"
    moto.client().put_object(Bucket=bucket, Key=killed, Body=b"x" * 10)
    return exp, uri


def test_ls_runs_and_checkpoints(run, moto, bucket, capsys):
    _, uri = run
    assert run_ls(_cli("ls", uri, "--s3-endpoint-url", moto.endpoint)) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == uri
    rows = [line.split() for line in lines[2:]]
    assert rows[0][0] == "5" and rows[0][3] == "complete"
    assert rows[1][0] == "10" and rows[1][3:] == ["complete", "(latest)"]
    assert rows[2][0] == "15" and rows[2][1:] == ["10", "B", "incomplete"]
    assert run_ls(_cli("ls", f"s3://{bucket}/runs", "--s3-endpoint-url", moto.endpoint)) == 0
    assert capsys.readouterr().out.splitlines()[1].split() == ["exp1", "10"]


def test_pull_latest_round_trip(run, moto, tmp_path, capsys):
    exp, uri = run
    dest = tmp_path / "dest"
    assert run_pull(_cli("pull", uri, "--dest", str(dest), "--s3-endpoint-url", moto.endpoint)) == 0
    assert "Pulled step 10" in capsys.readouterr().out
    marker = read_local_marker(dest, 10)
    for entry in marker.files:
        assert (dest / entry.path).read_bytes() == (exp / entry.path).read_bytes()
    assert not [p for p in dest.iterdir() if p.name.startswith(".dmdr-pull-step")]


def test_concurrent_pulls_download_once(run, moto, tmp_path):
    """Every rank of a node may call download_checkpoint: one downloads, the others reuse it."""
    from concurrent.futures import ThreadPoolExecutor

    _, uri = run
    dest = tmp_path / "dest"
    cfg = StorageConfig(s3_uri=uri, endpoint_url=moto.endpoint)
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: download_checkpoint(uri, 10, dest, cfg=cfg), range(4)))
    assert all(r == results[0] for r in results)
    marker = dest / "checkpoints/step-10.complete.json"
    mtime = marker.stat().st_mtime_ns
    download_checkpoint(uri, 10, dest, cfg=cfg)
    assert marker.stat().st_mtime_ns == mtime  # already there: nothing downloaded or rewritten


def test_pull_only_lora_writes_its_own_marker_not_a_checkpoint(run, moto, tmp_path):
    _, uri = run
    dest = tmp_path / "dest"
    run_pull(_cli("pull", uri, "--step", "5", "--only", "lora", "--dest", str(dest),
                  "--s3-endpoint-url", moto.endpoint))
    pulled = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())
    assert pulled == ["checkpoints/lora_gen/step-5/adapter_model.safetensors",
                      "checkpoints/lora_gui/step-5/adapter_model.safetensors",
                      "checkpoints/step-5.lora.json"]  # no lock file left, no complete marker


def test_corrupt_object_is_detected_and_nothing_is_placed(run, moto, bucket, tmp_path):
    exp, uri = run
    key = "runs/exp1/checkpoints/accelerator_1/step-10/model.safetensors"
    size = (exp / "checkpoints/accelerator_1/step-10/model.safetensors").stat().st_size
    moto.client().put_object(Bucket=bucket, Key=key, Body=os.urandom(size))  # same size, other bytes
    dest = tmp_path / "dest"
    with pytest.raises(UserError, match=f"Checksum mismatch for s3://{bucket}/{key}"):
        download_checkpoint(uri, 10, dest, cfg=StorageConfig(s3_uri=uri, endpoint_url=moto.endpoint))
    assert not (dest / "checkpoints").exists()
    assert [p.name for p in dest.iterdir()] == []  # temp folder and lock file cleaned up too


def test_pull_bad_step_and_empty_run(run, moto, bucket, tmp_path):
    _, uri = run
    with pytest.raises(UserError, match=r"step 15 .* not complete .*\[5, 10\]"):
        run_pull(_cli("pull", uri, "--step", "15", "--dest", str(tmp_path),
                      "--s3-endpoint-url", moto.endpoint))
    with pytest.raises(UserError, match="no complete checkpoint"):
        run_pull(_cli("pull", f"s3://{bucket}/runs/none", "--dest", str(tmp_path),
                      "--s3-endpoint-url", moto.endpoint))
    with pytest.raises(UserError, match="does not exist"):
        run_ls(_cli("ls", "s3://missing-bucket-x/runs", "--s3-endpoint-url", moto.endpoint))
