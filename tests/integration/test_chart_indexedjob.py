"""launcher=indexedjob: a plain batch/v1 Indexed Job plus a headless Service, no operator.

Rendering: the objects validate against the Kubernetes schemas, carry the rendezvous env the
Job controller does not inject, and the podFailurePolicy sorts exits as intended.

The pod simulation (slow): the cpu-tiny values (2 pods x 2 processes, gloo, S3 on a moto
server) rendered with launcher=indexedjob; each pod is the pod spec the Job controller creates
for its index (helpers_indexedjob: JOB_COMPLETION_INDEX, hostname under the headless Service) as
a local process group. Once the first checkpoint is in S3 a node is lost, index 0's (the c10d
store host) or index 1's, or index 0's as its part of the final checkpoint goes up (its S3 traffic
held first): its pod is SIGKILLed and carries DisruptionTarget. The controller
model then decides everything (podFailurePolicy, backoffLimitPerIndex, the per-index backoff delay, a new pod
with empty emptyDirs): the job must complete with every step logged once in S3.
"""
from __future__ import annotations

import json
import re
import shutil
import time

import pytest

import helpers_helm as h
import helpers_indexedjob as ij
from helpers_pods import (CKPT_STEPS, SECRET, Pod, cpu_tiny_values, last_logged_step, latest,
                          s3_object, stand_in_pods, tiny_model)  # noqa: F401 (fixture)
from helpers_s3 import (ACCESS_KEY, SECRET_KEY, TcpProxy, bucket, free_port, listening, moto,  # noqa: F401 (fixtures)
                        s3_env, wait_for)

PODS, PROCS = 2, 2
MAX_STEPS = 2 * CKPT_STEPS  # one checkpoint before the loss, one after: the shortest proof
FIRST_CKPT_TIMEOUT = 300
RUN_TIMEOUT = 300
S3 = {"uri": "s3://bucket/prefix", "credentials": {"existingSecret": "s3-creds"}}
EXAMPLE = h.ROOT / "k8s" / "values" / "indexedjob.yaml"


def _render(extra: dict | None = None, release: str = "run") -> list[dict]:
    values = h.render_chart.merge_values({"launcher": "indexedjob", "storage": {"s3": S3}}, extra or {})
    return h.render_objects(values, release=release)


def _env(container: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container["env"]}


@pytest.mark.parametrize("values", [
    pytest.param(None, id="default"),
    pytest.param("cpu-tiny", id="cpu-tiny"),
    pytest.param("example", id="k8s-example"),
])
def test_objects_validate_against_kubernetes_schemas(values):
    if values == "cpu-tiny":
        values = h.render_chart.merge_values(h.values_file(h.CHART_DIR / "ci" / "cpu-tiny-values.yaml"),
                                             {"launcher": "indexedjob"})
        objects = h.render_objects(values)
    elif values == "example":
        values = h.values_file(EXAMPLE)
        objects = h.render_objects(values)
    else:
        values = {"launcher": "indexedjob", "storage": {"s3": S3}}
        objects = _render()
    assert h.render_chart.lint(values) == []
    assert {o["kind"] for o in objects} >= {"ConfigMap", "Service", "Job"}
    assert not h.by_kind(objects, "PyTorchJob")
    for obj in objects:
        h.validate_k8s(obj)  # the Job's pod template included (batch/v1 is a core schema)
    job = h.the(objects, "Job")
    created = {**job["spec"]["template"], "spec": ij.controller_pod_spec(job, 0)}
    h.validate_k8s(h.as_pod(created, f"{job['metadata']['name']}-0-abcde"))  # as the controller creates it


def test_indexed_job_shape_service_and_failure_policy():
    objects = _render({"job": {"replicas": 3, "backoffLimit": 4}, "kueue": {"queueName": "team-a"}})
    job, service = h.the(objects, "Job"), h.the(objects, "Service")
    name = job["metadata"]["name"]
    spec = job["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 3, 3)
    assert spec["backoffLimitPerIndex"] == 4 and spec["maxFailedIndexes"] == 0
    assert "backoffLimit" not in spec  # per index instead
    assert spec["podReplacementPolicy"] == "Failed"
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never" and pod["subdomain"] == service["metadata"]["name"] == name
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    assert service["spec"]["selector"] == {"batch.kubernetes.io/job-name": name}
    assert service["spec"]["ports"][0]["port"] == 23456

    # exit 2 (a bad config) fails the job; a lost node is retried without counting; anything
    # else counts against the index's backoffLimitPerIndex
    assert ij.policy_action(job, 2, set()) == "FailJob"
    assert ij.policy_action(job, 137, {"DisruptionTarget"}) == "Ignore"
    assert ij.policy_action(job, 143, {"DisruptionTarget"}) == "Ignore"
    assert [ij.policy_action(job, code, set()) for code in (1, 137, 143)] == ["Count"] * 3


def test_rendezvous_env_is_the_chart_s_and_the_index_the_controller_s():
    objects = _render({"job": {"replicas": 3}, "elastic": {"maxRestarts": 7}})
    job = h.the(objects, "Job")
    name = job["metadata"]["name"]
    env = _env(job["spec"]["template"]["spec"]["containers"][0])
    assert env["PET_NNODES"] == "3" and env["PET_NPROC_PER_NODE"] == "8"
    assert env["PET_RDZV_BACKEND"] == "c10d" and env["PET_RDZV_ENDPOINT"] == f"{name}-0.{name}:23456"
    assert env["PET_MAX_RESTARTS"] == "7" and env["PET_RDZV_ID"] == name
    assert env["PET_RDZV_CONF"] == "join_timeout=1800,read_timeout=600"
    assert env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"
    assert "JOB_COMPLETION_INDEX" not in env  # the controller adds it
    spec = ij.controller_pod_spec(job, 2)
    assert spec["hostname"] == f"{name}-2"
    [index] = [e for e in spec["containers"][0]["env"] if e["name"] == "JOB_COMPLETION_INDEX"]
    assert index["valueFrom"]["fieldRef"]["fieldPath"] == ij.INDEX_FIELD
    # replicas outside the elastic range concern PyTorchJob only
    assert h.the(_render({"job": {"replicas": 4}, "elastic": {"maxReplicas": 2}}), "Job")["spec"]["completions"] == 4


@pytest.mark.parametrize("values, expected", [
    pytest.param({"storage": {"s3": {"uri": "", "credentials": {"existingSecret": ""}}}},
                 "launcher=indexedjob replaces a failed pod with a new one", id="no-durable-outputs"),
    pytest.param({"gangScheduling": {"enabled": True}},
                 "gangScheduling.enabled does not work with launcher=indexedjob", id="gang"),
    pytest.param({"extraEnv": [{"name": "JOB_COMPLETION_INDEX", "value": "0"}]},
                 "env JOB_COMPLETION_INDEX is set by the training operator or the chart's launcher",
                 id="controller-env"),
    pytest.param({"extraEnv": [{"name": "PET_NNODES", "value": "1"}]},
                 "env PET_NNODES is set by the training operator or the chart's launcher", id="chart-env"),
    pytest.param({"launcher": "mpijob"}, "/launcher", id="enum"),
])
def test_bad_values_fail_with_a_clear_message(values, expected):
    base = {"launcher": "indexedjob", "storage": {"s3": S3}}
    assert expected in h.render_error(h.render_chart.merge_values(base, values))


def test_names_fit_dns_labels_for_long_release_names():
    release = "a" + "b" * 52
    objects = _render({"job": {"replicas": 1024}}, release=release)
    name = h.the(objects, "Job")["metadata"]["name"]
    assert len(f"{name}-1023") <= 63 and not name.endswith("-")  # the pods' hostnames


def test_notes_name_the_job_and_its_pods():
    notes = h.render({"launcher": "indexedjob", "storage": {"s3": S3}}, release="run7",
                     namespace="team")[h.render_chart.NOTES]
    assert "Indexed Job team/run7-dmdr" in notes
    assert "kubectl get job run7-dmdr -n team -w" in notes
    assert "-l batch.kubernetes.io/job-name=run7-dmdr -c pytorch --prefix" in notes
    assert "batch.kubernetes.io/job-completion-index=0" in notes
    assert "pytorchjob" not in notes.lower()


@pytest.mark.parametrize("script, expected", [
    ("raise SystemExit(2)", "Failed: pod-1 exited 2 (podFailurePolicy FailJob)"),
    ("raise SystemExit(1)", "Failed: pod-1 failed 2 times (backoffLimitPerIndex 1)"),
], ids=["exit-2", "backoff-exhausted"])
def test_the_controller_model_fails_fast_on_exit_2_and_retries_only_the_failed_index(
        tmp_path, monkeypatch, script, expected):
    """The model itself, on stand-in pods: pod 1 fails at once, pod 0 would run 30 s."""
    monkeypatch.setattr(ij, "DEFAULT_BACKOFF", 0.5)  # the 10 s base delay, shortened for the model check
    job = h.the(_render({"job": {"replicas": 2, "backoffLimit": 1}}), "Job")
    pods = stand_in_pods(tmp_path, ["import time; time.sleep(30)", script])
    indexes = [ij.Index(pod) for pod in pods]
    try:
        for pod in pods:
            pod.start()
        result = ij.run_job(job, indexes, timeout=25)
    finally:
        for pod in pods:
            pod.kill()
    assert result == expected
    assert pods[0].starts == 1  # the other index is never restarted for it


# [store-host-lost-final-upload] (issue #11's intermittent hang, made deterministic): the store
# host's node goes dark (its S3 traffic stops) as it starts uploading its part of the final
# checkpoint and is lost DARK_S later, when every rank is past the last training step. Node 0
# (the survivor here) used to wait for that part; torchrun, its rendezvous gone, sent SIGTERM and
# the trainer kept waiting --shutdown-grace (280 s), so the survivor's pod failed only ~290 s
# later and its replacement came after the job's timeout. Now node 0 waits at a barrier behind
# the other nodes' closes, which the lost node fails at once.
DARK_S = 2
SURVIVOR_EXIT_TIMEOUT = 120  # torchrun's --shutdown-timeout is 290 s here: far more is a hang


@pytest.mark.slow
@pytest.mark.parametrize("lost, final_upload", [(0, False), (1, False), (0, True)],
                         ids=["store-host-lost", "peer-lost", "store-host-lost-final-upload"])
def test_indexed_job_pods_train_and_finish_after_a_node_is_lost(tmp_path, moto, bucket, tiny_model, lost,
                                                                final_upload):
    port = free_port()
    values = cpu_tiny_values(moto, bucket, max_steps=MAX_STEPS)
    values["launcher"] = "indexedjob"
    objects = h.render_objects(values)
    job = h.the(objects, "Job")
    secrets = {SECRET: {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}}
    replicas = ij.local_replicas(objects, tmp_path / "pods", secrets, port=port)
    assert [r.name for r in replicas] == ["run-dmdr-0", "run-dmdr-1"]
    for index, r in enumerate(replicas):
        assert r.env["JOB_COMPLETION_INDEX"] == str(index)
        assert r.env["PET_NNODES"] == str(PODS) and r.env["PET_RDZV_BACKEND"] == "c10d"
        assert r.env["PET_RDZV_ENDPOINT"] == f"127.0.0.1:{port}"  # run-dmdr-0.run-dmdr
        assert f"--nproc-per-node={PROCS}" in r.argv and r.argv[-2:] == ["--resume-ckpt", "auto"]
        shutil.copytree(tiny_model, r.mounts["/home/dmdr/.cache"] / "dmdr" / tiny_model.name)

    logs = tmp_path / "logs"
    logs.mkdir()
    pods = [Pod(r, logs) for r in replicas]
    indexes = [ij.Index(pod) for pod in pods]
    proxy = TcpProxy(moto.port).up() if final_upload else None  # the lost pod's way to S3
    if proxy:
        proxy.hold_from(lambda method, path: f"/step-{MAX_STEPS}/" in path)
        replicas[lost].env["AWS_ENDPOINT_URL"] = proxy.endpoint
    try:
        # The controller creates both pods at once; index 1 waits for index 0's store
        # (is_host=false: it never hosts it, even when it starts first).
        pods[1].start()
        pods[0].start()
        ready = proxy.held.is_set if proxy else (lambda: latest(moto, bucket))
        wait_for(lambda: all(p.alive() for p in pods) and ready(), timeout=FIRST_CKPT_TIMEOUT, interval=0.1,
                 what=f"{pods[lost].name} uploading step {MAX_STEPS}" if proxy else "a checkpoint in S3")
        if proxy:
            # node ranks follow the pods' start order here (one host: the agents' pids), so the
            # store host is node 1 and the survivor node 0, the one that publishes checkpoints
            assert any(path.endswith("/node-1.json") for _, path, _ in proxy.requests), proxy.requests
            time.sleep(DARK_S)
        committed = wait_for(lambda: latest(moto, bucket), interval=0.1, what="a checkpoint in S3")
        assert committed == CKPT_STEPS
        pods[lost].kill()  # the node is lost: PodGC marks the pod DisruptionTarget
        replicas[lost].env["AWS_ENDPOINT_URL"] = moto.endpoint  # its replacement runs on a sound node
        lost_after = last_logged_step(pods)
        newest = latest(moto, bucket)
        if final_upload:  # the survivor does not wait for the lost node's part until torchrun kills it
            survivor = pods[1 - lost]
            wait_for(lambda: survivor.proc.poll() is not None, timeout=SURVIVOR_EXIT_TIMEOUT, interval=0.2,
                     what=f"{survivor.name} to exit after losing {pods[lost].name}")
        result = ij.run_job(job, indexes, RUN_TIMEOUT, conditions={pods[lost].name: {"DisruptionTarget"}})
    finally:
        for pod in pods:
            pod.kill()
        if proxy:
            proxy.down()

    assert result == "Complete", result
    # the lost node did not count against its index
    assert indexes[lost].exits[0] == (137, "Ignore") and indexes[lost].counted == 0
    survivor = indexes[1 - lost]
    print(f"survivor {survivor.pod.name}: exits {survivor.exits}, starts {survivor.pod.starts}")
    assert all(exit == (1, "Count") for exit in survivor.exits), survivor.exits
    if lost == 0:  # the survivor lost the rendezvous store: its torchrun exits 1, counted once
        assert survivor.exits
    else:  # the store host restarts its workers and takes the replacement back in
        assert not survivor.exits
    assert max(s.counted for s in indexes) <= int(job["spec"]["backoffLimitPerIndex"])
    assert SECRET_KEY not in "".join(p.output() for p in pods)

    log = s3_object(moto, bucket, "log.txt").decode()
    resumed = [int(s) for s in re.findall(r"resumed from \S+/step-(\d+): generator step", log)]
    assert resumed and resumed[0] == newest >= committed, (resumed, newest)
    assert lost_after - newest <= CKPT_STEPS, (lost_after, newest)
    assert latest(moto, bucket) == MAX_STEPS
    manifest = json.loads(s3_object(moto, bucket, f"checkpoints/step-{MAX_STEPS}.complete.json"))
    assert manifest["world_size"] == PODS * PROCS and manifest["num_nodes"] == PODS
    rows = s3_object(moto, bucket, "loss_logs/loss_gen_log.jsonl").decode().splitlines()
    assert [json.loads(r)["step"] for r in rows] == list(range(1, MAX_STEPS + 1))
