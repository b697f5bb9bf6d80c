"""Pure storage logic: URIs, layout paths, manifests, config validation, retention policy."""
import json

import botocore.exceptions as bexc
import pytest

from dmdr.errors import UserError
from dmdr.storage.client import (StorageConfig, effective_checksum_mode, effective_endpoint, safe_endpoint,
                                 translate_error)
from dmdr.storage.layout import Manifest, in_group, manifest_step, marker_rel, read_local_marker, step_of
from dmdr.storage.remote import StepObjects, split_step
from dmdr.storage.commit import retention_victims
from dmdr.storage.uri import S3Uri, is_s3_uri


def test_uri_parse_join_roundtrip():
    uri = S3Uri.parse("s3://my-bucket/runs/a/")
    assert (uri.bucket, uri.key, uri.prefix, uri.name) == ("my-bucket", "runs/a", "runs/a/", "a")
    joined = uri.join("exp1", "/checkpoints/latest.json")
    assert str(joined) == "s3://my-bucket/runs/a/exp1/checkpoints/latest.json"
    root = S3Uri.parse("s3://my-bucket")
    assert (root.key, root.prefix, str(root)) == ("", "", "s3://my-bucket")
    assert root.join("x").key == "x"
    assert uri.relative("runs/a/exp/log.txt") == "exp/log.txt"
    assert is_s3_uri("s3://b/x") and not is_s3_uri("/data/x") and not is_s3_uri(None)


@pytest.mark.parametrize("bad", ["/local/path", "s3://", "s3://Bad_Bucket/x", "s3://ab/x",
                                 "s3://bucket/a//b", "s3://bucket/a/../b", "gs://bucket/x"])
def test_uri_rejects_bad_input_with_one_clear_message(bad):
    with pytest.raises(UserError) as err:
        S3Uri.parse(bad)
    assert bad in str(err.value) and "s3://" in str(err.value)


def test_split_step_of_a_checkpoint_uri():
    assert split_step("s3://b-1/runs/exp/step-300") == ("s3://b-1/runs/exp", 300)
    assert split_step("s3://b-1/runs/exp/") == ("s3://b-1/runs/exp", None)
    assert split_step("s3://b-1/step-3") == ("s3://b-1/step-3", None)  # a run named step-3 at the root


def test_step_paths():
    assert marker_rel(500) == "checkpoints/step-500.complete.json"
    assert step_of("checkpoints/accelerator_1/step-500/model.safetensors") == 500
    assert step_of("checkpoints/torch_units/step-42.pt") == 42
    assert step_of("checkpoints/step-7.complete.json") == 7
    assert step_of("checkpoints/step-7.parts/a1b2/node-1.json") == 7
    assert step_of("checkpoints/latest.json") is None
    assert step_of("samples/step-10.png") is None  # not under checkpoints/
    assert step_of("checkpoints/lora_gen/step-50000x/a") is None
    assert manifest_step("checkpoints/step-7.complete.json") == 7
    assert manifest_step("checkpoints/step-7.parts/a1b2/node-1.json") is None


def test_only_groups():
    gen = "checkpoints/accelerator_1/step-1/model.safetensors"
    lora = "checkpoints/lora_gui/step-1/adapter_model.safetensors"
    assert in_group(gen, "generator") and not in_group(lora, "generator")
    assert in_group(lora, "lora") and not in_group(gen, "lora")
    assert in_group("checkpoints/lora_gen/step-1/adapter_model.safetensors", "generator")
    assert in_group("checkpoints/accelerator_1/step-1/sharded/__0_0.distcp", "generator")  # FSDP: weights inside
    assert in_group("checkpoints/torch_units/step-1.pt", "all")
    with pytest.raises(UserError, match="--only"):
        in_group(gen, "weights")


def test_only_generator_leaves_out_what_only_a_resume_needs():
    for rel in ("accelerator_1/step-1/optimizer.bin", "accelerator_1/step-1/scheduler.bin",
                "accelerator_1/step-1/random_states_0.pkl", "accelerator_2/step-1/optimizer.bin",
                "torch_units/step-1.pt", "lora_gui/step-1/adapter_model.safetensors"):
        assert not in_group(f"checkpoints/{rel}", "generator"), rel


def test_a_partial_pull_has_its_own_marker_that_resume_ignores(tmp_path):
    from dmdr.checkpoint import complete_steps
    from dmdr.storage.layout import pulled_marker_rel, pulled_subset_steps

    assert pulled_marker_rel(4, "all") == marker_rel(4)
    (tmp_path / "checkpoints").mkdir()
    for step, only in ((4, "generator"), (6, "lora"), (8, "all")):
        (tmp_path / pulled_marker_rel(step, only)).write_text("{}")
    assert pulled_subset_steps(tmp_path / "checkpoints", "generator") == [4]
    assert pulled_subset_steps(tmp_path / "checkpoints", "lora") == [6]
    assert complete_steps(tmp_path / "checkpoints") == [8]


def test_a_removed_lock_file_still_excludes(tmp_path):
    """Processes taking a lock that is deleted on release never hold it at the same time."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_locked_increments, args=(tmp_path,)) for _ in range(4)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(60)
        assert proc.exitcode == 0
    assert (tmp_path / "count").read_text() == "100"  # a lost update would mean two holders
    assert not (tmp_path / "x.lock").exists()


def _locked_increments(folder):
    import time

    from dmdr.storage.hashio import file_lock

    for _ in range(25):
        with file_lock(folder / "x.lock", remove=True):
            count = folder / "count"
            value = int(count.read_text()) if count.exists() else 0
            time.sleep(0.001)
            count.write_text(str(value + 1))


def test_local_marker_roundtrip_and_errors(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(UserError, match="no completion marker"):
        read_local_marker(tmp_path, 3)
    marker = {"step": 3, "files": [{"path": "checkpoints/torch_units/step-3.pt", "size": 9}],
              "world_size": 2, "time": 1.5}
    (tmp_path / marker_rel(3)).write_text(json.dumps(marker))
    manifest = read_local_marker(tmp_path, 3)
    assert (manifest.step, manifest.world_size, manifest.size) == (3, 2, 9)
    assert Manifest.from_json(manifest.to_json(), "x") == manifest
    marker["files"][0]["path"] = "../../etc/passwd"
    (tmp_path / marker_rel(3)).write_text(json.dumps(marker))
    with pytest.raises(UserError, match="malformed"):
        read_local_marker(tmp_path, 3)


def test_config_validation():
    with pytest.raises(UserError, match="checksum mode"):
        StorageConfig(checksum_mode="always")
    with pytest.raises(UserError, match="part size"):
        StorageConfig(part_size_mb=1)
    with pytest.raises(UserError, match="s3://"):
        StorageConfig(s3_uri="bucket/prefix")
    with pytest.raises(UserError, match="--s3-uri"):
        StorageConfig().uri


def test_checksum_mode_when_required_for_custom_endpoints(monkeypatch, tmp_path):
    for key in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REQUEST_CHECKSUM_CALCULATION", "AWS_PROFILE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    aws = StorageConfig()
    assert effective_endpoint(aws) is None and effective_checksum_mode(aws, None) == "when_supported"
    minio = StorageConfig(endpoint_url="http://minio:9000")
    assert effective_checksum_mode(minio, effective_endpoint(minio)) == "when_required"
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://ceph:7480")
    assert effective_endpoint(aws) == "http://ceph:7480"
    assert effective_checksum_mode(aws, effective_endpoint(aws)) == "when_required"
    asked = StorageConfig(endpoint_url="http://minio:9000", checksum_mode="when_supported")
    assert effective_checksum_mode(asked, "http://minio:9000") == "when_supported"
    monkeypatch.setenv("AWS_REQUEST_CHECKSUM_CALCULATION", "WHEN_SUPPORTED")
    assert effective_checksum_mode(minio, "http://minio:9000") == "when_supported"


def _steps(**spec):
    """step -> StepObjects; spec values: manifest time, or None for an incomplete step."""
    return {int(k[1:]): StepObjects(keys=[k], has_manifest=t is not None, manifest_time=t or 0.0)
            for k, t in spec.items()}


def test_retention_keeps_newest_complete_and_latest():
    steps = _steps(s100=1.0, s200=2.0, s300=3.0, s400=4.0)
    assert retention_victims(steps, latest=400, keep_last=2) == [100, 200]
    assert retention_victims(steps, latest=400, keep_last=0) == []


def test_retention_never_deletes_latest_even_when_it_is_not_among_the_newest():
    steps = _steps(s100=1.0, s200=2.0, s300=3.0)
    assert 100 not in retention_victims(steps, latest=100, keep_last=1)
    assert retention_victims(steps, latest=100, keep_last=1) == [200]


def test_retention_orders_by_completion_time_and_cleans_old_debris():
    # 900 and 1000 come from an abandoned attempt (older manifests); 250 and 150 were killed mid-upload.
    steps = _steps(s900=1.0, s1000=2.0, s100=3.0, s150=None, s200=4.0, s250=None)
    assert retention_victims(steps, latest=200, keep_last=2) == [150, 900, 1000]


def test_endpoint_credentials_never_reach_messages():
    assert safe_endpoint("http://key:secret@minio:9000") == "http://minio:9000"
    err = translate_error(bexc.EndpointConnectionError(endpoint_url="http://minio:9000"),
                          S3Uri("bkt", "runs"), "http://key:secret@minio:9000")
    assert "secret" not in str(err) and "http://minio:9000" in str(err)
