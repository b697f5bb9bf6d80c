"""Resume is verified and falls back instead of crash-looping (real runs, real HTTP to moto):
a damaged newest local checkpoint is re-pulled from the store, or skipped without one; a damaged
newest remote checkpoint is skipped for the previous complete one."""
import json

import pytest

from helpers_s3 import aws_env, bucket, moto, s3_env  # noqa: F401 (fixtures)
from helpers_train import run_dmdr, tiny_args

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def truncate(path, keep=100):
    path.write_bytes(path.read_bytes()[:keep])


def test_truncated_rng_state_is_a_damaged_checkpoint_and_resume_falls_back(tmp_path, cache):
    common = ["--checkpoint-steps", "2", "--sample-steps", "1000"]
    run_dmdr(tiny_args(tmp_path, "r", cache, "--max-train-steps", "4", *common), cache)
    truncate(tmp_path / "r" / "checkpoints" / "accelerator_1" / "step-4" / "random_states_0.pkl")
    proc = run_dmdr(tiny_args(tmp_path, "r", cache, "--max-train-steps", "4", "--resume-ckpt", "auto", *common), cache)
    out = proc.stdout + proc.stderr
    assert "checkpoint step-4" in out and "is damaged: checkpoints/accelerator_1/step-4/random_states_0.pkl is 100 bytes" in out
    assert "generator step 2" in out  # the previous complete checkpoint, then steps 3 and 4 again


def test_damaged_checkpoints_are_repulled_or_skipped_with_s3(tmp_path, cache, moto, bucket):
    s3 = ["--s3-uri", f"s3://{bucket}/runs", "--s3-endpoint-url", moto.endpoint]
    common = ["--checkpoint-steps", "2", "--sample-steps", "1000", "--resume-ckpt", "auto", *s3]
    run_dmdr(tiny_args(tmp_path / "pod1", "e", cache, "--max-train-steps", "4", *common), cache, **aws_env())

    # 1. the pod's persistent volume holds a damaged newest checkpoint: the store's copy is pulled again
    model = tmp_path / "pod1" / "e" / "checkpoints" / "accelerator_1" / "step-4" / "model.safetensors"
    truncate(model)
    proc = run_dmdr(tiny_args(tmp_path / "pod1", "e", cache, "--max-train-steps", "4", *common), cache,
                    check=False, **aws_env())
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "checkpoint step-4" in out and "is damaged: checkpoints/accelerator_1/step-4/model.safetensors" in out
    assert "pulled checkpoint step-4" in out and "sha256 verified" in out and "generator step 4" in out
    assert model.stat().st_size > 100

    # 2. a byte of the newest remote checkpoint flipped: a new pod resumes from the previous one
    s3c = moto.client()
    key = "runs/e/checkpoints/accelerator_1/step-4/model.safetensors"
    body = bytearray(s3c.get_object(Bucket=bucket, Key=key)["Body"].read())
    body[len(body) // 2] ^= 0xFF
    s3c.put_object(Bucket=bucket, Key=key, Body=bytes(body))
    proc = run_dmdr(tiny_args(tmp_path / "pod2", "e", cache, "--max-train-steps", "4", *common), cache,
                    check=False, **aws_env())
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert f"Checksum mismatch for s3://{bucket}/{key}" in out and "skipping step-4" in out
    assert "pulled checkpoint step-2" in out and "generator step 2" in out
    latest = json.loads(s3c.get_object(Bucket=bucket, Key="runs/e/checkpoints/latest.json")["Body"].read())
    assert latest["step"] == 4  # retrained and uploaded again: the store is whole once more
