"""No secret in any file: credentials in an --s3-endpoint-url (user:password@) are used but never
written: not to args.json, logs, the trackers' files (TensorBoard, W&B offline, MLflow), manifests
or the lease, locally or in the bucket, nor printed. The TensorBoard events reach the bucket."""
import pytest

from helpers_s3 import aws_env, bucket, moto, s3_env  # noqa: F401 (fixtures)
from helpers_tracking import tracker_env
from helpers_train import run_dmdr, tiny_args

pytestmark = pytest.mark.slow
SECRET = "Pw-0f-the-store-9731"


def test_endpoint_password_never_lands_in_a_file_or_the_bucket(tmp_path, moto, bucket):
    cache = tmp_path / "cache"
    endpoint = moto.endpoint.replace("http://", f"http://dmdr-user:{SECRET}@")
    proc = run_dmdr(tiny_args(tmp_path / "out", "s", cache, "--max-train-steps", "2", "--checkpoint-steps", "2",
                              "--sample-steps", "2", "--report-to", "all", "--s3-uri", f"s3://{bucket}/runs",
                              "--s3-endpoint-url", endpoint), cache, **aws_env(tracker_env(tmp_path)))
    assert SECRET not in proc.stdout + proc.stderr
    files = [p for p in tmp_path.rglob("*") if p.is_file() and "cache" not in p.relative_to(tmp_path).parts[:1]]
    assert any(p.name == "args.json" for p in files) and any("events.out.tfevents" in p.name for p in files)
    assert any(p.suffix == ".wandb" for p in files) and any(p.parent.name == "params" for p in files)  # W&B, MLflow
    assert [p for p in files if SECRET.encode() in p.read_bytes()] == []
    assert moto.endpoint in (tmp_path / "out" / "s" / "args.json").read_text()  # the URL, without credentials

    client = moto.client()
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="runs/")["Contents"]]
    assert "runs/s/args.json" in keys and "runs/s/checkpoints/step-2.complete.json" in keys
    assert any(k.startswith("runs/s/tensorboard/") and "events.out.tfevents" in k for k in keys), keys
    assert "runs/s/tracking.json" in keys  # the W&B / MLflow run ids a restarted pod continues
    leaked = [k for k in keys if SECRET.encode() in client.get_object(Bucket=bucket, Key=k)["Body"].read()]
    assert leaked == []
