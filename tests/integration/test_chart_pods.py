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
import subprocess
import time
from pathlib import Path

import psutil
import pytest

import helpers_helm as h
from helpers_s3 import (ACCESS_KEY, SECRET_KEY, bucket, free_port, listening, moto, s3_env,  # noqa: F401 (fixtures)
                        wait_for)

pytestmark = pytest.mark.slow

REPLICAS, PROCS, BATCH = 2, 2, 2
MAX_STEPS, CKPT_STEPS = 12, 4
SECRET = "dmdr-s3"
EXP = "run"  # training.expName defaults to the release name
PREFIX = f"runs/{EXP}"
# Sandbox only, never in a pod: this machine has no model hub.
SANDBOX_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
# About 2 minutes in all on 2 busy cores; a hang fails within these bounds.
FIRST_CKPT_TIMEOUT = 300  # both pods started, rendezvoused and committed the first checkpoint
RUN_TIMEOUT = 300  # the rest of the job, restart included (30 s of it: the rendezvous last call)


class Pod:
    """One replica as its own process group (torchrun agent + workers), output to log files."""

    def __init__(self, replica: h.LocalReplica, logs: Path):
        self.replica, self.logs = replica, logs
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    @property
    def name(self) -> str:
        return self.replica.name

    @property
    def outputs(self) -> Path:
        return self.replica.mounts["/workspace/outputs"]

    def start(self) -> None:
        self.starts += 1
        with (self.logs / f"{self.name}.{self.starts}.log").open("w") as log:
            self.proc = subprocess.Popen(
                self.replica.argv, env={**self.replica.env, **SANDBOX_ENV},
                cwd=self.replica.mounts["/home/dmdr"], stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)

    def kill(self) -> None:
        """SIGKILL every process of the pod: a node lost, no SIGTERM, no flush.

        torchrun starts each worker in a session of its own, so the agent's process group
        is not enough: the agent is frozen first (it spawns nothing more), then its whole
        process tree is killed, as when a pod's PID namespace goes away.
        """
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            agent = psutil.Process(self.proc.pid)
            agent.suspend()
            tree = [agent, *agent.children(recursive=True)]
        except psutil.NoSuchProcess:
            tree = []
        for proc in tree:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        self.proc.wait(timeout=30)  # reaped by Popen first, so its returncode stays -9 (not 0)
        psutil.wait_procs(tree[1:], timeout=30)

    def reschedule(self) -> None:
        """The pod comes back on another node: its emptyDir outputs are empty."""
        shutil.rmtree(self.outputs)
        self.outputs.mkdir()

    def output(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in sorted(self.logs.glob(f"{self.name}.*.log")))

    def alive(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"{self.name} exited {self.proc.returncode}:\n{self.output()[-5000:]}")
        return True


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


def _object(moto, bucket: str, key: str) -> bytes | None:
    client = moto.client()
    try:
        return client.get_object(Bucket=bucket, Key=f"{PREFIX}/{key}")["Body"].read()
    except client.exceptions.NoSuchKey:
        return None


def _latest(moto, bucket: str) -> int | None:
    body = _object(moto, bucket, "checkpoints/latest.json")
    return json.loads(body)["step"] if body else None


def _last_logged_step(pods: list[Pod]) -> int:
    """The newest generator step in rank 0's local loss log (rank 0 is on one of the pods)."""
    steps = [json.loads(line)["step"] for pod in pods
             for path in [pod.outputs / EXP / "loss_logs" / "loss_gen_log.jsonl"] if path.exists()
             for line in path.read_text().splitlines() if line.strip()]
    return max(steps, default=0)


def _values(moto, bucket: str) -> dict:
    values = h.values_file(h.CHART_DIR / "ci" / "cpu-tiny-values.yaml")
    assert values["job"]["replicas"] == REPLICAS and values["distributed"]["procsPerPod"] == PROCS
    values["storage"]["s3"].update(uri=f"s3://{bucket}/runs", endpointUrl=moto.endpoint,
                                   credentials={"existingSecret": SECRET})
    values["training"]["overrides"].update(max_train_steps=MAX_STEPS, checkpoint_steps=CKPT_STEPS,
                                           sample_steps=1000, sync_interval=1)
    return values


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """The builtin tiny SDXL, built once: pods get it pre-warmed in their cache volume (like a
    cache PVC), which saves each pod the build. (Built inside the job it works too: the trainer
    builds it in a clean subprocess, since transformers' save_pretrained writes nothing on a
    process whose global rank is not 0.)"""
    from dmdr.models.tiny import TINY_SPEC_VERSION, build_tiny_sdxl

    return build_tiny_sdxl(tmp_path_factory.mktemp("tiny") / f"tiny-sdxl-v{TINY_SPEC_VERSION}")


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
        committed = wait_for(lambda: all(p.alive() for p in pods) and _latest(moto, bucket),
                             timeout=FIRST_CKPT_TIMEOUT, interval=0.1, what="a checkpoint in S3")
        assert committed == CKPT_STEPS
        victim = pods[0] if disk == "rescheduled" else pods[1]
        victim.kill()
        lost_after = _last_logged_step(pods)  # steps done when the node went away
        newest = _latest(moto, bucket)  # the newest complete checkpoint at that moment
        if disk == "rescheduled":
            victim.reschedule()
        victim.start()
        _run_like_the_operator(pods, RUN_TIMEOUT)
    finally:
        for pod in pods:
            pod.kill()

    assert SECRET_KEY not in "".join(p.output() for p in pods)
    log = _object(moto, bucket, "log.txt").decode()
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
    assert _latest(moto, bucket) == MAX_STEPS
    manifest = json.loads(_object(moto, bucket, f"checkpoints/step-{MAX_STEPS}.complete.json"))
    assert manifest["world_size"] == world and manifest["num_nodes"] == REPLICAS
    # the loss log continues where the checkpoint was: every step once, in order
    rows = _object(moto, bucket, "loss_logs/loss_gen_log.jsonl").decode().splitlines()
    assert [json.loads(r)["step"] for r in rows] == list(range(1, MAX_STEPS + 1))
