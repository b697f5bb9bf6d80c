"""Multi-node commit: node 0 moves latest.json only after every node's part is uploaded."""
import json
import time

import pytest

from dmdr.storage import StorageConfig, Syncer, latest_complete
from helpers_s3 import bucket, make_checkpoint, moto, s3_env  # noqa: F401

pytestmark = pytest.mark.slow
NODE0 = {"accelerator_1/step-{s}/model.safetensors": 800, "accelerator_1/step-{s}/random_states_0.pkl": 10,
         "accelerator_1/step-{s}/random_states_1.pkl": 10, "torch_units/step-{s}.pt": 50}
NODE1 = {"accelerator_1/step-{s}/random_states_2.pkl": 10, "accelerator_1/step-{s}/random_states_3.pkl": 10}


def test_latest_waits_for_every_node(moto, bucket, tmp_path):
    uri = f"s3://{bucket}/p/exp"
    cfg = StorageConfig(s3_uri=uri, endpoint_url=moto.endpoint)
    make_checkpoint(tmp_path / "n0", 1, NODE0, world_size=4)
    make_checkpoint(tmp_path / "n1", 1, NODE1, world_size=4)
    node0 = Syncer(tmp_path / "n0", uri, cfg, num_nodes=2, node_rank=0, sync_interval=0)
    node1 = Syncer(tmp_path / "n1", uri, cfg, num_nodes=2, node_rank=1, sync_interval=0)
    try:
        node0.submit_checkpoint(1)
        assert not node0.wait_checkpoint(timeout=1.5)  # still waiting for node 1
        assert latest_complete(uri, cfg) is None
        node1.submit_checkpoint(1)
        assert node1.wait_checkpoint(timeout=30) and node0.wait_checkpoint(timeout=30)
    finally:
        node0.close(timeout=10)
        node1.close(timeout=10)
    assert latest_complete(uri, cfg) == 1
    reply = moto.client().get_object(Bucket=bucket, Key="p/exp/checkpoints/step-1.complete.json")
    manifest = json.loads(reply["Body"].read())
    assert manifest["num_nodes"] == 2 and manifest["world_size"] == 4
    assert {f["path"].rsplit("/", 1)[1] for f in manifest["files"]} == {
        "model.safetensors", "random_states_0.pkl", "random_states_1.pkl", "random_states_2.pkl",
        "random_states_3.pkl", "step-1.pt"}
    assert all(len(f["sha256"]) == 64 for f in manifest["files"])


def test_a_missing_node_leaves_latest_alone(moto, bucket, tmp_path):
    uri = f"s3://{bucket}/p/exp"
    cfg = StorageConfig(s3_uri=uri, endpoint_url=moto.endpoint)
    make_checkpoint(tmp_path / "n0", 1, NODE0, world_size=4)
    with Syncer(tmp_path / "n0", uri, cfg, num_nodes=2, node_rank=0, sync_interval=0,
                node_wait_timeout=0.5) as node0:
        node0.submit_checkpoint(1)
        started = time.monotonic()
        while node0.abandoned_checkpoints != [1] and time.monotonic() - started < 20:
            time.sleep(0.1)
    assert node0.abandoned_checkpoints == [1]
    assert latest_complete(uri, cfg) is None
