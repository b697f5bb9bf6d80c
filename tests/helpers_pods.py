"""Rendered pods as local processes, for the pod simulations of each launcher.

`Pod` runs one LocalReplica (a pod as its controller creates it, see helpers_helm.local_pod)
as its own process group; the S3 helpers read what the run left in the store; `tiny_model`
is the builtin tiny SDXL built once per module (import it into the test module as a fixture).
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest

import helpers_helm as h
from helpers_s3 import SECRET_KEY, wait_for

MAX_STEPS, CKPT_STEPS = 12, 4
SECRET = "dmdr-s3"
EXP = "run"  # training.expName defaults to the release name
PREFIX = f"runs/{EXP}"
# Sandbox only, never in a pod: this machine has no model hub.
SANDBOX_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


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
        gone, _ = psutil.wait_procs(tree, timeout=30)
        # psutil reaped the agent: keep its status (Popen would report 0 for a reaped child)
        status = next((p.returncode for p in gone if p.pid == self.proc.pid), None)
        if status is not None:
            self.proc.returncode = status
        self.proc.wait(timeout=30)

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


def s3_object(moto, bucket: str, key: str) -> bytes | None:
    client = moto.client()
    try:
        return client.get_object(Bucket=bucket, Key=f"{PREFIX}/{key}")["Body"].read()
    except client.exceptions.NoSuchKey:
        return None


def stand_in_pods(folder: Path, scripts: list[str]) -> list[Pod]:
    """Pods running a Python one-liner each, to check a controller model quickly."""
    pods = []
    for index, script in enumerate(scripts):
        mounts = {"/workspace/outputs": folder / f"out{index}", "/home/dmdr": folder}
        mounts["/workspace/outputs"].mkdir()
        pods.append(Pod(h.LocalReplica(f"pod-{index}", [sys.executable, "-c", script], {}, mounts), folder))
    return pods


def latest(moto, bucket: str) -> int | None:
    body = s3_object(moto, bucket, "checkpoints/latest.json")
    return json.loads(body)["step"] if body else None


def last_logged_step(pods: list[Pod]) -> int:
    """The newest generator step in rank 0's local loss log (rank 0 is on one of the pods)."""
    steps = [json.loads(line)["step"] for pod in pods
             for path in [pod.outputs / EXP / "loss_logs" / "loss_gen_log.jsonl"] if path.exists()
             for line in path.read_text().splitlines() if line.strip()]
    return max(steps, default=0)


@dataclass
class LostPod:
    """What a run of a pod set that lost a pod left for the assertions."""
    outcome: Any  # the controller model's outcome (helpers_jobset_sim.Outcome)
    lost: Pod
    committed: int  # the first checkpoint seen in S3
    newest: int  # the newest checkpoint in S3 right after the pod was lost
    lost_after: int  # the newest step rank 0 had logged then
    everyone: list[Pod]  # every pod of every attempt
    output: str


def lose_pod_1_and_finish(run, moto, bucket: str, first_ckpt_timeout: float, run_timeout: float) -> LostPod:
    """Start `run` (a helpers_jobset_sim.JobSetRun), SIGKILL pod 1 once a checkpoint is in S3 (a
    node lost: no SIGTERM, no flush) and supervise the set to its end."""
    try:
        run.start()
        committed = wait_for(lambda: run.step() is None and latest(moto, bucket),
                             timeout=first_ckpt_timeout, interval=0.2, what="a checkpoint in S3")
        lost = run.pods[1]
        lost.kill()
        newest, lost_after = latest(moto, bucket), last_logged_step(run.pods)
        outcome = run.run(run_timeout, describe=lambda: "\n".join(
            f"--- {p.name}\n{p.output()[-3000:]}" for p in run.pods))
    finally:
        run.stop()
    everyone = [p for pods in run.attempts for p in pods]
    return LostPod(outcome, lost, committed, newest, lost_after, everyone, "".join(p.output() for p in everyone))


def assert_set_restarted_once_and_finished(got: LostPod, moto, bucket: str, max_steps: int,
                                           world: int, nodes: int) -> list[int]:
    """The whole set restarted once, resumed from a checkpoint no older than the newest in S3
    when the pod was lost, and finished: every step in the S3 loss log exactly once, no secret in
    any output. Returns the steps the log says it resumed from."""
    assert SECRET_KEY not in got.output
    assert got.outcome.state == "Completed", (got.outcome, got.output[-6000:])
    assert (got.lost.name, 137) in got.outcome.failures
    assert got.outcome.restarts == 1 and len(got.everyone) == 2 * nodes  # the whole set, once
    log = s3_object(moto, bucket, "log.txt").decode()
    resumed = [int(s) for s in re.findall(r"resumed from \S+/step-(\d+): generator step", log)]
    assert resumed and resumed[0] >= got.newest >= got.committed >= CKPT_STEPS, (resumed, got)
    assert got.lost_after - resumed[0] <= CKPT_STEPS, (got.lost_after, resumed)
    assert latest(moto, bucket) == max_steps
    manifest = json.loads(s3_object(moto, bucket, f"checkpoints/step-{max_steps}.complete.json"))
    assert manifest["world_size"] == world and manifest["num_nodes"] == nodes
    rows = s3_object(moto, bucket, "loss_logs/loss_gen_log.jsonl").decode().splitlines()
    assert [json.loads(r)["step"] for r in rows] == list(range(1, max_steps + 1))
    return resumed


def cpu_tiny_values(moto, bucket: str, max_steps: int = MAX_STEPS) -> dict:
    """charts/dmdr/ci/cpu-tiny-values.yaml with S3 on the moto server (Secret SECRET)."""
    values = h.values_file(h.CHART_DIR / "ci" / "cpu-tiny-values.yaml")
    values["storage"]["s3"].update(uri=f"s3://{bucket}/runs", endpointUrl=moto.endpoint,
                                   credentials={"existingSecret": SECRET})
    values["training"]["overrides"].update(max_train_steps=max_steps, checkpoint_steps=CKPT_STEPS,
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
