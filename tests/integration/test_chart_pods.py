"""The chart's rendered pods, run as local processes.

The cpu-tiny value set is rendered by Helm's engine with S3 pointing at a moto server. Each
Worker pod of the elastic PyTorchJob becomes a process group running exactly the pod's command,
args and env plus what the training operator injects (helpers_helm.local_replicas: pod names
resolved to loopback, each pod's volumes its OWN folders, Secret values from a dict).
The two pods rendezvous (c10d), train the tiny preset with 2 pods x 2 processes and checkpoint
to S3. One pod is then SIGKILLed mid-run and started again with the same command, either
worker-0 (the c10d store host, whose loss restarts every pod: kubeflow/trainer#1638) on an empty
disk (recreated elsewhere) or worker-1 with its emptyDirs kept (restarted in place): the job must
continue from the last complete S3 checkpoint, every step logged once. The pods then run as the
operator sees them: one that exits non-zero is restarted (OnFailure), and the first that exits 0
marks the elastic job Succeeded, so the others are killed at once (cleanPodPolicy Running): the
final checkpoint and logs must already be complete in S3 by then.
"""
from __future__ import annotations

import json
import re
import shutil
import time

import pytest

import helpers_helm as h
from helpers_pods import (CKPT_STEPS, EXP, MAX_STEPS, SECRET, Pod, cpu_tiny_values, last_logged_step, latest,
                          s3_object, tiny_model)  # noqa: F401 (fixture)
from helpers_s3 import (ACCESS_KEY, SECRET_KEY, bucket, free_port, listening, moto, s3_env,  # noqa: F401 (fixtures)
                        wait_for)

pytestmark = pytest.mark.slow

REPLICAS, PROCS, BATCH = 2, 2, 2
# About 2 minutes in all on 2 busy cores; a hang fails within these bounds.
FIRST_CKPT_TIMEOUT = 300  # both pods started, rendezvoused and committed the first checkpoint
RUN_TIMEOUT = 300  # the rest of the job, restart included (30 s of it: the rendezvous last call)


def _run_like_the_operator(pods: list[Pod], timeout: float, restarts: int = 5) -> Pod:
    """Supervise the pods as the training operator does an elastic job with restartPolicy
    OnFailure and cleanPodPolicy Running; returns the pod whose exit 0 ended the job."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pod in pods:
            code = pod.proc.poll()
            if code == 0:  # Succeeded: the other pods are deleted, whatever they were doing
                for other in pods:
                    if other is not pod:
                        other.kill()
                return pod
            if code is not None:
                assert pod.starts <= restarts, f"{pod.name} exited {code} again:\n{pod.output()[-6000:]}"
                pod.start()
        time.sleep(0.2)
    raise AssertionError(f"no pod finished in {timeout:.0f}s:\n" +
                         "\n".join(f"--- {p.name}\n{p.output()[-3000:]}" for p in pods))


def _values(moto, bucket: str) -> dict:
    values = cpu_tiny_values(moto, bucket)
    assert values["job"]["replicas"] == REPLICAS and values["distributed"]["procsPerPod"] == PROCS
    return values


@pytest.mark.parametrize("disk", ["rescheduled", "kept"])
def test_rendered_pods_train_and_resume_from_s3_after_a_pod_is_killed(tmp_path, moto, bucket, tiny_model, disk):
    port = free_port()
    objects = h.render_objects(_values(moto, bucket))
    assert SECRET_KEY not in json.dumps(objects)  # the Secret is referenced, never inlined
    secrets = {SECRET: {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}}
    replicas = h.local_replicas(objects, tmp_path / "pods", secrets, port=port)
    assert [r.name for r in replicas] == ["run-dmdr-worker-0", "run-dmdr-worker-1"]
    for r in replicas:
        assert r.env["PET_NNODES"] == "1:2" and r.env["PET_RDZV_BACKEND"] == "c10d"
        assert r.env["PET_RDZV_ENDPOINT"] == f"127.0.0.1:{port}"
        assert f"--nproc-per-node={PROCS}" in r.argv and r.argv[-2:] == ["--resume-ckpt", "auto"]
        assert r.env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"  # else the restarted pod hangs
        shutil.copytree(tiny_model, r.mounts["/home/dmdr/.cache"] / "dmdr" / tiny_model.name)
    assert len({r.mounts["/workspace/outputs"] for r in replicas}) == REPLICAS  # no shared disk

    logs = tmp_path / "logs"
    logs.mkdir()
    pods = [Pod(r, logs) for r in replicas]
    try:
        # worker-0 hosts the c10d store (PET_RDZV_ENDPOINT names its pod), so it starts first
        pods[0].start()
        wait_for(lambda: pods[0].alive() and listening(port), timeout=120, interval=0.2,
                 what="worker-0's rendezvous store")
        pods[1].start()
        committed = wait_for(lambda: all(p.alive() for p in pods) and latest(moto, bucket),
                             timeout=FIRST_CKPT_TIMEOUT, interval=0.1, what="a checkpoint in S3")
        assert committed == CKPT_STEPS
        victim = pods[0] if disk == "rescheduled" else pods[1]
        victim.kill()
        lost_after = last_logged_step(pods)  # steps done when the node went away
        newest = latest(moto, bucket)  # the newest complete checkpoint at that moment
        if disk == "rescheduled":
            victim.reschedule()
        victim.start()
        _run_like_the_operator(pods, RUN_TIMEOUT)
    finally:
        for pod in pods:
            pod.kill()

    assert SECRET_KEY not in "".join(p.output() for p in pods)
    log = s3_object(moto, bucket, "log.txt").decode()
    # WORLD_SIZE counts processes, not pods, in the first attempt and after the restart
    world = REPLICAS * PROCS
    line = f"{world} processes x batch {BATCH} x accumulation 1 = {world * BATCH} prompts per step"
    assert log.count(line) >= 2, log[-5000:]
    # the restarted job resumed from the newest complete checkpoint in S3: at most one
    # checkpoint interval of work lost
    resumed = [int(s) for s in re.findall(r"resumed from \S+/step-(\d+): generator step", log)]
    assert resumed, log[-5000:]
    assert resumed[0] == newest >= committed, (resumed, newest)
    assert lost_after - newest <= CKPT_STEPS, (lost_after, newest)
    # the restarted pod has the weights: it never wrote them (wiped, or not rank 0), so from S3
    pulled = victim.outputs / EXP / "checkpoints" / "accelerator_1" / f"step-{resumed[0]}"
    assert (pulled / "model.safetensors").is_file() and (pulled / "random_states_0.pkl").is_file()
    assert latest(moto, bucket) == MAX_STEPS
    manifest = json.loads(s3_object(moto, bucket, f"checkpoints/step-{MAX_STEPS}.complete.json"))
    assert manifest["world_size"] == world and manifest["num_nodes"] == REPLICAS
    # the loss log continues where the checkpoint was: every step once, in order
    rows = s3_object(moto, bucket, "loss_logs/loss_gen_log.jsonl").decode().splitlines()
    assert [json.loads(r)["step"] for r in rows] == list(range(1, MAX_STEPS + 1))
