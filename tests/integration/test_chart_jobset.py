"""launcher=jobset: a JobSet (jobset.x-k8s.io/v1alpha2) of one Indexed Job, for clusters with
JobSet but no Kubeflow.

Rendering: the JobSet validates against its CRD, the child Job and pod the controllers make
from it against the Kubernetes schemas; the failure policy restarts the whole set except for a
bad config (exit 2). The pod simulation (slow): the cpu-tiny values rendered with
launcher=jobset, each pod as the JobSet and Job controllers create it (helpers_jobset), one pod
SIGKILLed after the first checkpoint: the whole set restarts (helpers_jobset_sim.JobSetRun: a
new attempt, every pod new, on empty disks) and the job still finishes with every step logged
once in S3.
"""
from __future__ import annotations

import shutil

import pytest

import helpers_helm as h
import helpers_jobset as hj
from helpers_jobset_sim import JobSetRun
from helpers_pods import (CKPT_STEPS, SECRET, Pod, assert_set_restarted_once_and_finished, cpu_tiny_values,
                          lose_pod_1_and_finish, tiny_model)  # noqa: F401 (fixture)
from helpers_s3 import ACCESS_KEY, SECRET_KEY, bucket, free_port, moto, s3_env  # noqa: F401 (fixtures)

PODS, PROCS = 2, 2
MAX_STEPS = 2 * CKPT_STEPS
GRACE = 30  # terminationGracePeriodSeconds: the kubelet's SIGKILL for pods deleted by a restart
FIRST_CKPT_TIMEOUT = 300
RUN_TIMEOUT = 300
S3 = {"uri": "s3://bucket/prefix", "credentials": {"existingSecret": "s3-creds"}}
CRD = h.CRDS_DIR / "jobset.x-k8s.io_jobsets.yaml"
EXAMPLE = h.ROOT / "k8s" / "values" / "jobset.yaml"


def _render(extra: dict | None = None, release: str = "run") -> list[dict]:
    values = h.render_chart.merge_values({"launcher": "jobset", "storage": {"s3": S3}}, extra or {})
    return h.render_objects(values, release=release)


@pytest.mark.parametrize("values", [
    pytest.param({"launcher": "jobset", "storage": {"s3": S3}}, id="default"),
    pytest.param("cpu-tiny", id="cpu-tiny"),
    pytest.param("example", id="k8s-example"),
])
def test_jobset_validates_against_its_crd_and_its_pods_against_kubernetes(values):
    if values == "cpu-tiny":
        values = h.render_chart.merge_values(h.values_file(h.CHART_DIR / "ci" / "cpu-tiny-values.yaml"),
                                             {"launcher": "jobset"})
    elif values == "example":
        values = h.values_file(EXAMPLE)
    assert h.render_chart.lint(values) == []
    objects = h.render_objects(values)
    jobset = h.the(objects, "JobSet")
    assert not h.by_kind(objects, "PyTorchJob") and not h.by_kind(objects, "Service")
    for obj in objects:
        if obj["kind"] != "JobSet":
            h.validate_k8s(obj)
    if CRD.exists():
        errors = sorted(h.crd_validator(CRD, "v1alpha2").iter_errors(jobset), key=lambda e: list(e.path))
        assert not errors, "\n".join(f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors)
    job = {**hj.child_job(jobset), "metadata": {"name": "run-dmdr-node-0", "namespace": "ml"}}
    h.validate_k8s(job)
    created = {**job["spec"]["template"], "spec": hj.ij.controller_pod_spec(job, 0)}
    h.validate_k8s(h.as_pod(created, "run-dmdr-node-0-0-abcde"))


def test_crd_validation_rejects_unknown_fields():
    if not CRD.exists():
        pytest.skip(f"CRD schemas not found at {h.CRDS_DIR}")
    jobset = h.the(_render(), "JobSet")
    jobset["spec"]["failurePolicy"]["maxRestart"] = 3
    assert any("maxRestart" in e.message for e in h.crd_validator(CRD, "v1alpha2").iter_errors(jobset))


def test_failure_policy_restarts_the_set_except_for_a_bad_config():
    jobset = h.the(_render({"job": {"replicas": 3, "backoffLimit": 4},
                            "kueue": {"queueName": "team-a"}}), "JobSet")
    spec = jobset["spec"]
    assert jobset["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    assert spec["network"] == {"enableDNSHostnames": True, "publishNotReadyAddresses": True}
    assert spec["failurePolicy"]["maxRestarts"] == 4
    assert spec["failurePolicy"]["restartStrategy"] == "BlockingRecreate"
    trainjob = h.the(h.render_objects({"launcher": "trainjob", "trainjob": {"runtime": {"create": True},
                                                                            "maxRestarts": 4},
                                       "storage": {"s3": S3}}), "TrainingRuntime")
    assert trainjob["spec"]["template"]["spec"]["failurePolicy"] == spec["failurePolicy"]  # one policy
    assert spec["successPolicy"] == {"operator": "All", "targetReplicatedJobs": ["node"]}
    [rjob] = spec["replicatedJobs"]
    job = rjob["template"]["spec"]
    assert (rjob["name"], rjob["replicas"]) == ("node", 1)
    assert (job["completionMode"], job["completions"], job["parallelism"], job["backoffLimit"]) == (
        "Indexed", 3, 3, 0)
    assert job["template"]["spec"]["restartPolicy"] == "Never"
    child = hj.child_job(jobset)
    # exit 2 fails the Job by its podFailurePolicy, and that reason fails the set; any other
    # failure exceeds backoffLimit 0 and restarts the whole set
    assert hj.ij.policy_action(child, 2, set()) == "FailJob"
    assert hj.jobset_action(jobset, "PodFailurePolicy") == "FailJobSet"
    assert hj.ij.policy_action(child, 137, {"DisruptionTarget"}) == "Count"
    assert hj.jobset_action(jobset, "BackoffLimitExceeded") == "RestartJobSet"


def test_static_rendezvous_env_from_the_pod_index():
    jobset = h.the(_render({"job": {"replicas": 3}}), "JobSet")
    name = jobset["metadata"]["name"]
    child = hj.child_job(jobset)
    env = {e["name"]: e for e in child["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["PET_NNODES"]["value"] == "3" and env["PET_NPROC_PER_NODE"]["value"] == "8"
    assert env["PET_MASTER_ADDR"]["value"] == f"{name}-node-0-0.{name}"  # index 0's DNS name
    assert env["PET_MASTER_PORT"]["value"] == "23456" and env["PET_MAX_RESTARTS"]["value"] == "0"
    assert env["PET_NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"] == hj.ij.INDEX_FIELD
    assert "PET_RDZV_BACKEND" not in env and "TORCH_DISABLE_SHARE_RDZV_TCP_STORE" not in env
    assert hj.ij.controller_pod_spec(child, 2)["hostname"] == f"{name}-node-0-2"
    assert child["spec"]["template"]["spec"]["subdomain"] == name


@pytest.mark.parametrize("values, expected", [
    pytest.param({"storage": {"s3": {"uri": "", "credentials": {"existingSecret": ""}}}},
                 "launcher=jobset replaces a failed pod with a new one", id="no-durable-outputs"),
    pytest.param({"gangScheduling": {"enabled": True}},
                 "gangScheduling.enabled does not work with launcher=jobset", id="gang"),
    pytest.param({"extraEnv": [{"name": "PET_NODE_RANK", "value": "0"}]},
                 "env PET_NODE_RANK is set by the training operator or the chart's launcher (jobset)",
                 id="chart-env"),
])
def test_bad_values_fail_with_a_clear_message(values, expected):
    base = {"launcher": "jobset", "storage": {"s3": S3}}
    assert expected in h.render_error(h.render_chart.merge_values(base, values))


def test_names_fit_dns_labels_for_long_release_names():
    jobset = h.the(_render({"job": {"replicas": 1024}}, release="a" + "b" * 52), "JobSet")
    name = jobset["metadata"]["name"]
    assert len(f"{name}-node-0-1023") <= 63 and not name.endswith("-")


def test_notes_name_the_jobset_and_its_pods():
    notes = h.render({"launcher": "jobset", "storage": {"s3": S3}}, release="run7",
                     namespace="team")[h.render_chart.NOTES]
    assert "JobSet team/run7-dmdr" in notes
    assert "kubectl get jobset run7-dmdr -n team -w" in notes
    assert "-l jobset.sigs.k8s.io/jobset-name=run7-dmdr -c pytorch --prefix" in notes
    assert "batch.kubernetes.io/job-completion-index=0" in notes


@pytest.mark.slow
def test_jobset_pods_restart_as_a_set_and_finish_after_a_pod_is_lost(tmp_path, moto, bucket, tiny_model):
    values = cpu_tiny_values(moto, bucket, max_steps=MAX_STEPS)
    values["launcher"] = "jobset"
    values["job"]["terminationGracePeriodSeconds"] = GRACE
    objects = h.render_objects(values)
    jobset = h.the(objects, "JobSet")
    secrets = {SECRET: {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}}
    logs = tmp_path / "logs"
    logs.mkdir()

    def attempt(number: int) -> list[Pod]:
        """A restart attempt's pods: new pods, new (empty) volumes, node 0 on a new port."""
        replicas = hj.local_replicas(objects, tmp_path / f"try{number}", secrets, port=free_port())
        assert [r.name for r in replicas] == ["run-dmdr-node-0-0", "run-dmdr-node-0-1"]
        for index, r in enumerate(replicas):
            assert r.env["PET_NODE_RANK"] == str(index) and r.env["PET_NNODES"] == str(PODS)
            assert r.env["PET_MASTER_ADDR"] == "127.0.0.1"  # run-dmdr-node-0-0.run-dmdr
            shutil.copytree(tiny_model, r.mounts["/home/dmdr/.cache"] / "dmdr" / tiny_model.name)
        return [Pod(r, logs) for r in replicas]

    policy = jobset["spec"]["failurePolicy"]
    assert policy["restartStrategy"] == "BlockingRecreate"
    run = JobSetRun(attempt, max_restarts=policy["maxRestarts"], grace=GRACE)
    got = lose_pod_1_and_finish(run, moto, bucket, FIRST_CKPT_TIMEOUT, RUN_TIMEOUT)
    assert_set_restarted_once_and_finished(got, moto, bucket, MAX_STEPS, world=PODS * PROCS, nodes=PODS)
