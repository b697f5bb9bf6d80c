"""launcher=trainjob: the chart as a Kubeflow Trainer v2 TrainJob, rendered by Helm's engine.

Checked against the TrainJob / ClusterTrainingRuntime CRDs (shared/crds), the Kubernetes Pod
schema for the pods the Trainer and JobSet would create from it (helpers_trainjob.node_pod:
runtime template, runtimePatches, trainer fields, the torch plugin's PET_* env), and the
render-time refusals of what a TrainJob cannot carry.
"""
from __future__ import annotations

import subprocess
import time

import pytest
import yaml

import helpers_helm as h
import helpers_trainjob as tj
from helpers_jobset_sim import JobSetRun

S3 = {"uri": "s3://bucket/runs", "credentials": {"existingSecret": "dmdr-s3"}}
RUNTIMES = [pytest.param(False, id="cluster-runtime"), pytest.param(True, id="chart-runtime")]


def _values(create: bool, **extra) -> dict:
    values = {"launcher": "trainjob", "trainjob": {"runtime": {"create": create}},
              "storage": {"s3": S3}, "job": {"replicas": 3}}
    return h.render_chart.merge_values(values, extra)


def _need_crds() -> None:
    if not tj.TRAINJOB_CRD.exists():
        pytest.skip(f"CRD schemas not found at {h.CRDS_DIR} (clone shared/ beside the repo)")


def _node(pod: dict) -> dict:
    return next(c for c in pod["spec"]["containers"] if c["name"] == tj.NODE)


@pytest.mark.parametrize("create", RUNTIMES)
def test_lint_is_clean(create):
    assert h.render_chart.lint(_values(create)) == []


@pytest.mark.parametrize("create", RUNTIMES)
def test_objects_validate_against_the_crds_and_the_pod_schema(create):
    _need_crds()
    objects = h.render_objects(_values(create, extraEnv=[{"name": "FOO", "value": "1"}]))
    hooks = [o for o in objects if "helm.sh/hook" in o["metadata"].get("annotations", {})]
    kinds = sorted(o["kind"] for o in objects if o not in hooks)  # helm test's store check aside
    assert kinds == sorted(["ConfigMap", "TrainJob"] + (["TrainingRuntime"] if create else []))
    for obj in objects:
        if obj["kind"] in ("TrainJob", "TrainingRuntime"):
            assert obj["apiVersion"] == "trainer.kubeflow.org/v1alpha1"
            assert not tj.trainjob_errors(obj), tj.trainjob_errors(obj)
        else:
            h.validate_k8s(obj)
    for index in range(3):
        h.validate_k8s(h.as_pod(tj.node_pod(objects, index), f"run-dmdr-node-0-{index}-abcde"))


def test_deep_crd_schemas_convert_in_linear_time():
    """The TrainJob CRD nests pod specs in runtime patches: converting each schema node once
    takes well under a second (converting 'properties' twice per level took ~50 s)."""
    _need_crds()
    crd = yaml.load(tj.TRAINJOB_CRD.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    started = time.monotonic()
    h._structural(crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"])
    assert time.monotonic() - started < 10


def test_crd_validation_bites():
    """The TrainJob schema of this Trainer version: unknown fields (an older API's
    podSpecOverrides, a priorityClassName in a runtime patch) are errors, as at the API server."""
    _need_crds()
    job = h.the(h.render_objects(_values(False)), "TrainJob")
    job["spec"]["podSpecOverrides"] = []
    pod_patch = job["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"][
        "replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
    pod_patch["priorityClassName"] = "high"
    job["spec"]["trainer"]["numNodes"] = "three"
    errors = "\n".join(tj.trainjob_errors(job))
    assert "podSpecOverrides" in errors and "priorityClassName" in errors and "'three'" in errors


@pytest.mark.parametrize("create", RUNTIMES)
def test_the_torch_plugin_env_and_the_shared_command(create):
    """Each node pod: the container "node" runs the chart's one command; the rendezvous comes
    from the torch plugin alone (PET_NNODES = pods, PET_NPROC_PER_NODE = processes per pod,
    PET_NODE_RANK = completion index, master <trainjob>-node-0-0.<trainjob>:29400)."""
    values = _values(create, resources={"gpusPerPod": 4})
    objects = h.render_objects(values)
    job = h.the(objects, "TrainJob")
    trainer = job["spec"]["trainer"]
    assert trainer["numNodes"] == 3 and trainer["numProcPerNode"] == 4
    assert trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == 4
    reserved = {"PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_MASTER_ADDR", "PET_MASTER_PORT"}
    assert not reserved & {e["name"] for e in trainer["env"]}  # the Trainer's webhook refuses them
    for index in range(3):
        pod = tj.node_pod(objects, index)
        container = _node(pod)
        assert [c["name"] for c in pod["spec"]["containers"]] == ["node"]
        assert container["command"] == ["python", "-m", "dmdr.launch.run"]
        assert container["args"][:9] == ["--nproc-per-node=4", "--shutdown-timeout=290", "-m", "dmdr",
                                         "train", "--config", "/etc/dmdr/config.yaml",
                                         "--resume-ckpt", "auto"]
        assert container["image"] == "ghcr.io/dmdr/dmdr:0.1.0"
        env = {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}
        assert env["PET_NNODES"] == "3" and env["PET_NPROC_PER_NODE"] == "4"
        assert env["PET_MASTER_ADDR"] == "run-dmdr-node-0-0.run-dmdr" and env["PET_MASTER_PORT"] == "29400"
        assert env["PET_NODE_RANK"]["fieldRef"]["fieldPath"] == tj.COMPLETION_INDEX
        assert env["DMDR_S3_URI"] == "s3://bucket/runs"
        assert env["AWS_SECRET_ACCESS_KEY"]["secretKeyRef"]["name"] == "dmdr-s3"
        assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE" not in env  # elastic-only: static rendezvous here
        assert {p["containerPort"] for p in container["ports"]} == {29400}  # no pytorchjob-port
        assert pod["metadata"]["annotations"]["kubectl.kubernetes.io/default-container"] == "node"
        mounts = {m["mountPath"] for m in container["volumeMounts"]}
        assert {"/etc/dmdr", "/dev/shm", "/tmp", "/home/dmdr", "/workspace/outputs"} <= mounts
        spec = pod["spec"]
        assert spec["terminationGracePeriodSeconds"] == 300
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}


def test_the_chart_runtime_restarts_the_whole_set_and_fails_fast_on_a_bad_config():
    objects = h.render_objects(_values(True, trainjob={"maxRestarts": 7}))
    runtime = h.the(objects, "TrainingRuntime")
    job = h.the(objects, "TrainJob")
    assert job["spec"]["runtimeRef"] == {"apiGroup": "trainer.kubeflow.org", "kind": "TrainingRuntime",
                                         "name": runtime["metadata"]["name"]}
    assert "runtimePatches" not in job["spec"]  # the runtime holds the whole pod template
    assert runtime["spec"]["mlPolicy"] == {"numNodes": 3, "torch": {}}
    jobset = runtime["spec"]["template"]["spec"]
    assert jobset["failurePolicy"]["maxRestarts"] == 7
    assert jobset["failurePolicy"]["restartStrategy"] == "BlockingRecreate"  # old pods gone first
    assert jobset["failurePolicy"]["rules"] == [{"name": "FailOnBadConfig", "action": "FailJobSet",
                                                 "onJobFailureReasons": ["PodFailurePolicy"]}]
    [rjob] = jobset["replicatedJobs"]
    assert rjob["name"] == "node"
    assert rjob["template"]["metadata"]["labels"]["trainer.kubeflow.org/trainjob-ancestor-step"] == "trainer"
    batch = rjob["template"]["spec"]
    assert batch["backoffLimit"] == 0
    assert batch["podFailurePolicy"]["rules"] == [{"action": "FailJob", "onExitCodes": {
        "containerName": "node", "operator": "In", "values": [2]}}]
    spec = batch["template"]["spec"]
    assert spec["restartPolicy"] == "Never"  # podFailurePolicy needs it; restarts are JobSet's
    # what runtimePatches cannot carry is in the chart's own runtime
    assert spec["automountServiceAccountToken"] is False and spec["enableServiceLinks"] is False
    prio = h.render_objects(_values(True, priorityClassName="high"))
    assert h.the(prio, "TrainingRuntime")["spec"]["template"]["spec"]["replicatedJobs"][0][
        "template"]["spec"]["template"]["spec"]["priorityClassName"] == "high"


def test_volcano_gang_scheduling_through_the_runtime_pod_group_policy():
    values = _values(True, gangScheduling={"enabled": True, "schedulerName": "volcano", "queue": "research"},
                     priorityClassName="high")
    objects = h.render_objects(values)
    runtime, job = h.the(objects, "TrainingRuntime"), h.the(objects, "TrainJob")
    assert runtime["spec"]["podGroupPolicy"] == {"volcano": {}}
    assert job["metadata"]["annotations"]["scheduling.volcano.sh/queue-name"] == "research"
    spec = tj.node_pod(objects, 0)["spec"]
    assert spec["schedulerName"] == "volcano" and spec["priorityClassName"] == "high"
    if tj.TRAINJOB_CRD.exists():
        assert not tj.trainjob_errors(runtime) and not tj.trainjob_errors(job)
    assert "podGroupPolicy" not in h.the(h.render_objects(_values(True)), "TrainingRuntime")["spec"]


def test_the_cluster_runtime_gets_the_pod_settings_as_runtime_patches():
    values = _values(False, nodeSelector={"pool": "gpu"},
                     tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                     serviceAccount={"create": True}, imagePullSecrets=[{"name": "regcred"}])
    objects = h.render_objects(values)
    job = h.the(objects, "TrainJob")
    assert job["spec"]["runtimeRef"] == {"apiGroup": "trainer.kubeflow.org",
                                         "kind": "ClusterTrainingRuntime", "name": "torch-distributed"}
    assert [p["manager"] for p in job["spec"]["runtimePatches"]] == ["dmdr.helm.chart"]
    spec = tj.node_pod(objects, 0)["spec"]
    assert spec["nodeSelector"] == {"pool": "gpu"} and spec["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert spec["serviceAccountName"] == h.the(objects, "ServiceAccount")["metadata"]["name"]
    assert spec["imagePullSecrets"] == [{"name": "regcred"}]
    assert {v["name"] for v in spec["volumes"]} == {"config", "dshm", "tmp", "home", "cache", "outputs"}


def test_kueue_label_and_deadline_on_the_trainjob():
    job = h.the(h.render_objects(_values(False, kueue={"queueName": "gpu-queue", "priorityClass": "high"},
                                         job={"activeDeadlineSeconds": 86400, "labels": {"team": "gen"},
                                              "annotations": {"owner": "me"}})), "TrainJob")
    assert job["metadata"]["labels"]["team"] == "gen" and job["metadata"]["annotations"] == {"owner": "me"}
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"
    assert job["metadata"]["labels"]["kueue.x-k8s.io/priority-class"] == "high"
    assert job["spec"]["activeDeadlineSeconds"] == 86400


def test_pod_names_fit_jobset_limits_for_long_release_names():
    release = "a-very-long-release-name-for-a-distillation-run-x"
    job = h.the(h.render_objects(_values(False), release=release), "TrainJob")
    name = job["metadata"]["name"]
    # JobSet's webhook: "<jobset>-node-0-<index>-<5 random>" must stay a 63-character label
    assert len(f"{name}-node-0-999-abcde") <= 63 and not name.endswith("-")
    if tj.TRAINJOB_CRD.exists():
        assert not tj.trainjob_errors(job)


def test_pytorchjob_only_values_do_not_get_in_the_way():
    """elastic.* belongs to the PyTorchJob: 3 static nodes render with the default 1..1 range."""
    objects = h.render_objects(_values(False, elastic={"enabled": True, "minReplicas": 1, "maxReplicas": 1}))
    assert h.the(objects, "TrainJob")["spec"]["trainer"]["numNodes"] == 3


@pytest.mark.parametrize("values, expected", [
    pytest.param(_values(False, gangScheduling={"enabled": True, "schedulerName": "volcano"}),
                 "set trainjob.runtime.create=true (the chart's runtime then has podGroupPolicy.volcano)",
                 id="gang-cluster-runtime"),
    pytest.param(_values(True, gangScheduling={"enabled": True, "schedulerName": "default-scheduler"}),
                 "set gangScheduling.schedulerName=volcano", id="gang-not-volcano"),
    pytest.param(_values(True, gangScheduling={"enabled": True, "schedulerName": "volcano", "minAvailable": 2}),
                 "Trainer's PodGroup always holds every pod", id="gang-min-available"),
    pytest.param(_values(True, gangScheduling={"enabled": True, "schedulerName": "volcano",
                                               "priorityClass": "high"}),
                 "the PodGroup takes the pods' priorityClassName", id="gang-priority-class"),
    pytest.param(_values(False, priorityClassName="high"),
                 "priorityClassName cannot be passed to the ClusterTrainingRuntime torch-distributed",
                 id="priority-class"),
    pytest.param(_values(False, topologySpreadConstraints=[{"maxSkew": 1, "topologyKey": "zone",
                                                            "whenUnsatisfiable": "DoNotSchedule"}]),
                 "set trainjob.runtime.create=true", id="topology-spread"),
    pytest.param(_values(False, initContainers=[{"name": "warm", "image": "busybox"}]),
                 "initContainers cannot be passed to the ClusterTrainingRuntime", id="init-containers"),
    pytest.param(_values(False, hostNetwork=True), "hostNetwork cannot be passed", id="host-network"),
    pytest.param({"launcher": "trainjob", "trainjob": {"runtime": {"create": True}}},
                 "trainjob.runtime.create recreates every pod when one fails", id="create-ephemeral"),
    pytest.param({"launcher": "trainjob", "extraEnv": [{"name": "PET_NNODES", "value": "2"}]},
                 "env PET_NNODES is set by the training operator", id="reserved-env"),
    pytest.param({"launcher": "trainjob", "trainjob": {"runtime": {"kind": "x"}}},
                 "additional properties 'kind' not allowed", id="schema"),
    pytest.param({"launcher": "mpijob"}, "launcher", id="unknown-launcher"),
])
def test_bad_values_fail_with_a_clear_message(values, expected):
    assert expected in h.render_error(values)


def test_notes_name_the_trainjob_commands():
    notes = h.render(_values(False))[h.render_chart.NOTES]
    assert "TrainJob ml/run-dmdr, 3 pod(s) x 8 process(es)" in notes
    assert "kubectl get trainjob run-dmdr -n ml -w" in notes
    assert "-l jobset.sigs.k8s.io/jobset-name=run-dmdr -c node" in notes
    assert "PyTorchJob" not in notes and "-c pytorch" not in notes


def test_example_renders_valid_trainjob_objects():
    _need_crds()
    path = h.ROOT / "k8s" / "rendered" / "trainjob.yaml"
    objects = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert {"TrainJob", "TrainingRuntime"} <= {o["kind"] for o in objects}
    for obj in objects:
        if "." in obj["apiVersion"]:
            assert not tj.trainjob_errors(obj), tj.trainjob_errors(obj)


# --- the JobSet driver the pod simulation runs on --------------------------------------------

class _Exit:
    """A pod whose container exits with a given code at once."""

    def __init__(self, name: str, code: int):
        self.name, self.code, self.proc = name, code, None

    def start(self):
        self.proc = subprocess.Popen(["sh", "-c", f"exit {self.code}"])

    def kill(self):
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
        if self.proc:
            self.proc.wait()


@pytest.mark.parametrize("codes, state, reason, restarts", [
    pytest.param([[137, 0], [0, 0]], "Completed", "AllJobsCompleted", 1, id="one-pod-lost"),
    pytest.param([[0, 2]], "Failed", "FailJobSet", 0, id="bad-config"),
    pytest.param([[1, 0]] * 3, "Failed", "ReachedMaxRestarts", 2, id="max-restarts"),
])
def test_jobset_driver_follows_the_failure_policy(codes, state, reason, restarts):
    run = JobSetRun(lambda attempt: [_Exit(f"p{i}-{attempt}", c) for i, c in enumerate(codes[attempt])],
                    max_restarts=2, grace=5)
    run.start()
    try:
        outcome = run.run(timeout=30)
    finally:
        run.stop()
    assert (outcome.state, outcome.reason, outcome.restarts) == (state, reason, restarts)
    assert len(run.attempts) == restarts + 1


def test_a_killed_pod_reports_exit_137_not_success(tmp_path):
    """The driver tells a lost pod from a finished one by its exit status: Pod.kill (SIGKILL of
    the whole tree) must leave the agent's status at -9, i.e. 137 in Kubernetes' terms."""
    from helpers_jobset_sim import exit_code
    from helpers_pods import Pod

    replica = h.LocalReplica("p", ["sleep", "30"], {"PATH": "/usr/bin:/bin"},
                             {"/home/dmdr": tmp_path, "/workspace/outputs": tmp_path})
    pod = Pod(replica, tmp_path)
    pod.start()
    pod.kill()
    assert exit_code(pod.proc.returncode) == 137
