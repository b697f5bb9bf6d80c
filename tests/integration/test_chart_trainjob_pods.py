"""launcher=trainjob: the chart's TrainJob pods as local processes, restarted as JobSet does.

The cpu-tiny values as a TrainJob on the chart's TrainingRuntime, S3 on a moto server. Each
node pod gets exactly the pod spec Kubeflow Trainer and JobSet build from the rendered objects
(helpers_trainjob.local_nodes: the container "node", the torch plugin's PET_* env, a static
torchrun rendezvous on node 0's hostname, its port a free one per attempt as a new pod has a
new address). The pods train the tiny preset as 2 pods x 2 processes, checkpointing to S3;
once a checkpoint is in S3 node 1 is SIGKILLed (a node lost). The pods are then supervised as
the Job and JobSet controllers do for the rendered failure policy (helpers_jobset_sim.JobSetRun:
the failed pod fails its Job, every pod is deleted, and once all are gone a new set of pods --
empty emptyDirs, node 0 at a new address -- is created); the run must finish from the last
complete S3 checkpoint with every step in the S3 loss log exactly once.
"""
from __future__ import annotations

import shutil

import pytest

import helpers_helm as h
import helpers_trainjob as tj
from helpers_jobset_sim import JobSetRun
from helpers_s3 import ACCESS_KEY, SECRET_KEY, bucket, free_port, moto, s3_env  # noqa: F401 (fixtures)
from helpers_pods import CKPT_STEPS, MAX_STEPS, SECRET, Pod, tiny_model  # noqa: F401 (fixture)
from helpers_pods import assert_set_restarted_once_and_finished, lose_pod_1_and_finish, s3_object as _object
from test_chart_pods import BATCH, PROCS, REPLICAS

pytestmark = pytest.mark.slow

GRACE = 30  # terminationGracePeriodSeconds: the kubelet's SIGKILL for pods deleted by a restart
FIRST_CKPT_TIMEOUT = 300
RUN_TIMEOUT = 300


def _values(moto, bucket: str) -> dict:
    values = h.values_file(h.CHART_DIR / "ci" / "cpu-tiny-values.yaml")
    values.update(launcher="trainjob", trainjob={"runtime": {"create": True}, "maxRestarts": 3})
    values["job"]["terminationGracePeriodSeconds"] = GRACE
    values["storage"]["s3"].update(uri=f"s3://{bucket}/runs", endpointUrl=moto.endpoint,
                                   credentials={"existingSecret": SECRET})
    values["training"]["overrides"].update(max_train_steps=MAX_STEPS, checkpoint_steps=CKPT_STEPS,
                                           sample_steps=1000, sync_interval=1)
    return values


def test_trainjob_pods_restart_as_a_set_and_resume_from_s3(tmp_path, moto, bucket, tiny_model):
    objects = h.render_objects(_values(moto, bucket))
    secrets = {SECRET: {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}}
    logs = tmp_path / "logs"
    logs.mkdir()

    def attempt(number: int) -> list[Pod]:
        """A new attempt's pods: new names, new (empty) volumes, node 0 at a new address."""
        port = free_port()
        pods = []
        for index in range(REPLICAS):
            node = tj.local_node(objects, index, tmp_path / "pods", secrets, port, f"try{number}")
            assert node.env["PET_NNODES"] == str(REPLICAS) and node.env["PET_NPROC_PER_NODE"] == str(PROCS)
            assert node.env["PET_NODE_RANK"] == str(index) and node.env["PET_MASTER_ADDR"] == "127.0.0.1"
            assert "PET_RDZV_ENDPOINT" not in node.env  # static rendezvous on node 0
            assert not any(node.mounts["/workspace/outputs"].iterdir())
            # the cache volume pre-warmed with the tiny model, as a cache PVC would hold it
            shutil.copytree(tiny_model, node.mounts["/home/dmdr/.cache"] / "dmdr" / tiny_model.name)
            pods.append(Pod(node, logs))
        return pods

    policy = h.the(objects, "TrainingRuntime")["spec"]["template"]["spec"]["failurePolicy"]
    assert policy["restartStrategy"] == "BlockingRecreate"
    run = JobSetRun(attempt, max_restarts=policy["maxRestarts"], grace=GRACE)
    world = REPLICAS * PROCS
    got = lose_pod_1_and_finish(run, moto, bucket, FIRST_CKPT_TIMEOUT, RUN_TIMEOUT)
    resumed = assert_set_restarted_once_and_finished(got, moto, bucket, MAX_STEPS, world=world, nodes=REPLICAS)
    assert all(p.starts == 1 for p in got.everyone)  # two new pods, each started once
    log = _object(moto, bucket, "log.txt").decode()
    line = f"{world} processes x batch {BATCH} x accumulation 1 = {world * BATCH} prompts per step"
    assert log.count(line) >= 2, log[-5000:]
    # node 1 is a new pod on an empty disk: it pulled the weights from S3
    pulled = run.pods[1].outputs / "run" / "checkpoints" / "accelerator_1" / f"step-{resumed[0]}"
    assert (pulled / "model.safetensors").is_file() and (pulled / "random_states_0.pkl").is_file()
