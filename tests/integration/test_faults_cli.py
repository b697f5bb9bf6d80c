"""Every storage failure of `dmdr ls` / `dmdr pull` is one line and exit 2, in seconds, over real
HTTP: a store answering 500s, one that never answers, damaged or stripped remote files."""
import json
import time

import pytest

from dmdr.cli import main
from dmdr.storage import StorageConfig, Syncer
from helpers_faults import ErrorServer, SilentServer
from helpers_s3 import bucket, make_checkpoint, moto, s3_env  # noqa: F401 (fixtures)


@pytest.fixture
def run(moto, bucket, tmp_path):
    """A run with complete checkpoints 1 and 2 in the store; returns its URI."""
    uri = f"s3://{bucket}/runs/e"
    with Syncer(tmp_path / "src", uri, StorageConfig(s3_uri=uri, endpoint_url=moto.endpoint)) as syncer:
        for step in (1, 2):
            make_checkpoint(tmp_path / "src", step)
            syncer.submit_checkpoint(step)
            assert syncer.wait_checkpoint(timeout=60)
    return uri


def dmdr(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("server", [ErrorServer, SilentServer])
def test_failing_or_silent_store_is_one_line_exit_2_with_retries_announced(server, s3_env, tmp_path, capsys):
    srv = server()
    try:
        started = time.monotonic()
        for cmd in (["ls", "s3://bucket/runs"], ["pull", "s3://bucket/runs/e", "--dest", str(tmp_path)]):
            code, out, err = dmdr(capsys, *cmd, "--s3-endpoint-url", srv.endpoint, "--s3-timeout", "1",
                                  "--s3-retries", "1")
            assert code == 2
            lines = err.strip().splitlines()
            assert "attempt 1/2 failed" in lines[0] and lines[0].endswith("retrying")
            assert lines[-1].startswith(f"dmdr {cmd[0]}: error: ") and len(lines) == 2, err
        assert time.monotonic() - started < 20
    finally:
        srv.close()


def test_damaged_manifest_and_pointer_are_reported_with_their_key(run, moto, bucket, tmp_path, capsys):
    s3 = moto.client()
    s3.put_object(Bucket=bucket, Key="runs/e/checkpoints/step-2.complete.json", Body=b"{not json")
    s3.put_object(Bucket=bucket, Key="runs/e/checkpoints/latest.json", Body=b"\x00garbage")
    code, out, err = dmdr(capsys, "ls", run, "--s3-endpoint-url", moto.endpoint)
    assert code == 0
    assert [line.split()[-1] for line in out.splitlines()[2:]] == ["complete", "DAMAGED"]
    assert f"{run}/checkpoints/step-2.complete.json is damaged (not JSON)" in err and "resume skips it" in err

    code, out, err = dmdr(capsys, "pull", run, "--dest", str(tmp_path / "a"), "--s3-endpoint-url", moto.endpoint)
    assert code == 0 and "Pulled step 1" in out  # the damaged pointer and manifest are skipped
    code, out, err = dmdr(capsys, "pull", run, "--step", "2", "--dest", str(tmp_path / "b"),
                          "--s3-endpoint-url", moto.endpoint)
    assert code == 2 and "step-2.complete.json is damaged (not JSON)" in err and "pull another step" in err


def test_pull_says_what_it_verified_and_names_a_missing_object(run, moto, bucket, tmp_path, capsys):
    s3 = moto.client()
    key = "runs/e/checkpoints/step-2.complete.json"
    manifest = json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
    for entry in manifest["files"]:
        entry.pop("sha256")
    s3.put_object(Bucket=bucket, Key=key, Body=json.dumps(manifest).encode())
    code, out, err = dmdr(capsys, "pull", run, "--step", "2", "--dest", str(tmp_path / "a"),
                          "--s3-endpoint-url", moto.endpoint)
    assert code == 0 and "sha256 verified" not in out and "sizes verified; the manifest has no sha256 for 5 of 5" in out

    gone = "runs/e/checkpoints/accelerator_1/step-1/model.safetensors"
    s3.delete_object(Bucket=bucket, Key=gone)
    code, out, err = dmdr(capsys, "pull", run, "--step", "1", "--dest", str(tmp_path / "b"),
                          "--s3-endpoint-url", moto.endpoint)
    assert code == 2 and f"s3://{bucket}/{gone} is missing" in err
    assert not list((tmp_path / "b").glob(".dmdr-pull-step-*"))  # no temporary folder left behind


@pytest.mark.parametrize("odd", ["checkpoints/a\x00b", "checkpoints/./x", "checkpoints", "checkpoints/accelerator_1",
                                 "checkpoints/accelerator_1/step-2/model.safetensors"])
def test_pull_refuses_odd_manifest_entries_and_a_file_as_dest(odd, run, moto, bucket, tmp_path, capsys):
    s3 = moto.client()
    key = "runs/e/checkpoints/step-2.complete.json"
    manifest = json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
    manifest["files"].append({"path": odd, "size": 1, "sha256": "0" * 64})  # a folder name, or a duplicate
    s3.put_object(Bucket=bucket, Key=key, Body=json.dumps(manifest).encode())
    dest = tmp_path / "dest"
    code, out, err = dmdr(capsys, "pull", run, "--step", "2", "--dest", str(dest), "--s3-endpoint-url", moto.endpoint)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "step-2.complete.json is malformed" in err, err
    assert not dest.exists() or not list(dest.glob(".dmdr-pull-step-*"))

    (tmp_path / "afile").write_text("x")
    code, out, err = dmdr(capsys, "pull", run, "--step", "1", "--dest", str(tmp_path / "afile"),
                          "--s3-endpoint-url", moto.endpoint)
    assert code == 2 and "is a file, not a folder" in err
