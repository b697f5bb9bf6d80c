"""The Helm chart, rendered by Helm's real engine (helm-python-sdk), checked against the
Kubernetes OpenAPI schemas, the PyTorchJob CRD, the pod security rules, and the environment
the training operator gives each pod; bad values must fail with a readable message."""
from __future__ import annotations

import json
import re
import socket
import subprocess
import textwrap
from pathlib import Path

import pytest
import yaml

import helpers_helm as h

VALUE_SETS = [pytest.param(None, id="default")] + [
    pytest.param(path, id=path.stem) for path in h.CI_VALUES]
CREDENTIAL = re.compile(r"(?i)((^|_)(TOKEN|SECRET|PASSWORD|PASSWD|PASSPHRASE|CREDENTIALS?|APIKEY)"
                        r"(_|$)|ACCESS_KEY|SECRET_KEY|API_KEY|PRIVATE_KEY)")
WRITABLE = ["/tmp", "/home/dmdr", "/home/dmdr/.cache", "/workspace/outputs", "/dev/shm"]
SENTINEL = "wJalrXUtnFEMI-K7MDENG-SENTINEL"
S3 = {"uri": "s3://bucket/prefix", "credentials": {"existingSecret": "s3-creds"}}


def _values(path: Path | None) -> dict:
    return h.values_file(path) if path else {}


def _pods(objects: list[dict]) -> list[tuple[str, dict]]:
    job = h.the(objects, "PyTorchJob")
    return list(h.replica_templates(job).items())


def _container(template: dict) -> dict:
    return next(c for c in template["spec"]["containers"] if c["name"] == "pytorch")


# --- every value set renders into valid, secure objects ------------------------------------

@pytest.mark.parametrize("path", VALUE_SETS)
def test_lint_is_clean(path):
    assert h.render_chart.lint(_values(path)) == []


def test_lint_catches_a_broken_chart(tmp_path):
    """The lint check is real: a chart whose template does not parse has findings."""
    broken = tmp_path / "dmdr"
    (broken / "templates").mkdir(parents=True)
    (broken / "Chart.yaml").write_text((h.CHART_DIR / "Chart.yaml").read_text())
    (broken / "values.yaml").write_text("a: 1\n")
    (broken / "templates" / "x.yaml").write_text("kind: {{ .Values.a \n")
    assert h.render_chart.lint(None, chart=broken)


@pytest.mark.parametrize("path", VALUE_SETS)
def test_objects_validate_against_kubernetes_schemas(path):
    objects = h.render_objects(_values(path))
    assert {"ConfigMap", "PyTorchJob"} <= {o["kind"] for o in objects}
    for obj in objects:
        if obj["kind"] != "PyTorchJob":
            h.validate_k8s(obj)
    for rtype, template in _pods(objects):
        h.validate_k8s(h.as_pod(template, f"run-dmdr-{rtype.lower()}-0"))


@pytest.mark.parametrize("path", VALUE_SETS)
def test_pytorchjob_validates_against_the_crd(path):
    if not h.PYTORCHJOB_CRD.exists():
        pytest.skip(f"CRD schemas not found at {h.CRDS_DIR} (clone shared/ beside the repo)")
    job = h.the(h.render_objects(_values(path)), "PyTorchJob")
    errors = sorted(h.crd_validator().iter_errors(job), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors)


def test_crd_validation_rejects_unknown_fields():
    if not h.PYTORCHJOB_CRD.exists():
        pytest.skip(f"CRD schemas not found at {h.CRDS_DIR}")
    job = h.the(h.render_objects(), "PyTorchJob")
    job["spec"]["elasticPolicy"]["maxReplica"] = 3
    job["spec"]["runPolicy"]["backoffLimit"] = "ten"
    messages = [e.message for e in h.crd_validator().iter_errors(job)]
    assert any("maxReplica" in m for m in messages) and any("'ten'" in m for m in messages)


@pytest.mark.parametrize("path", VALUE_SETS)
def test_pods_are_locked_down(path):
    objects = h.render_objects(_values(path))
    for rtype, template in _pods(objects):
        spec = template["spec"]
        where = f"{path and path.stem}/{rtype}"
        assert spec["securityContext"]["runAsNonRoot"] is True, where
        assert spec["securityContext"]["runAsUser"] > 0, where
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, where
        assert spec["automountServiceAccountToken"] is False, where
        assert not any(spec.get(k) for k in ("hostNetwork", "hostPID", "hostIPC")), where
        assert not any("hostPath" in v for v in spec["volumes"]), where
        assert template["metadata"]["annotations"]["sidecar.istio.io/inject"] == "false"

        ctx = _container(template)["securityContext"]
        assert ctx["allowPrivilegeEscalation"] is False, where
        assert ctx["privileged"] is False, where
        assert ctx["readOnlyRootFilesystem"] is True, where
        assert ctx["capabilities"] == {"drop": ["ALL"]}, where
        assert ctx["seccompProfile"] == {"type": "RuntimeDefault"}, where

        volumes = {v["name"]: v for v in spec["volumes"]}
        mounts = {m["mountPath"]: m for m in _container(template)["volumeMounts"]}
        for path_ in WRITABLE:
            volume = volumes[mounts[path_]["name"]]
            assert not mounts[path_].get("readOnly"), (where, path_)
            assert "emptyDir" in volume or "persistentVolumeClaim" in volume, (where, path_)
        shm = volumes[mounts["/dev/shm"]["name"]]["emptyDir"]
        assert shm["medium"] == "Memory" and shm["sizeLimit"], where
        assert mounts["/etc/dmdr"]["readOnly"] is True


@pytest.mark.parametrize("path", VALUE_SETS)
def test_credentials_only_by_reference(path):
    objects = h.render_objects(_values(path))
    assert not h.by_kind(objects, "Secret"), "the chart must never create a Secret"
    for _, template in _pods(objects):
        for env in _container(template)["env"]:
            if CREDENTIAL.search(env["name"]):
                assert "value" not in env, env
                assert "secretKeyRef" in env["valueFrom"], env


@pytest.mark.parametrize("values, message", [
    ({"storage": {"s3": {**S3, "credentials": {"secretAccessKey": SENTINEL}}}},
     "additional properties 'secretAccessKey' not allowed"),
    ({"training": {"overrides": {"aws_secret_access_key": SENTINEL}}},
     "training.overrides.aws_secret_access_key looks like a credential"),
    ({"training": {"overrides": {"hf_token": SENTINEL}}}, "plaintext ConfigMap"),
    ({"extraEnv": [{"name": "HF_TOKEN", "value": SENTINEL}]},
     "extraEnv HF_TOKEN has a literal value"),
    ({"extraEnv": [{"name": "AWS_SECRET_ACCESS_KEY", "value": SENTINEL}]}, "secretKeyRef"),
    ({"extraEnv": [{"name": "WANDB_API_KEY", "value": SENTINEL}]}, "literal value"),
])
def test_secret_values_are_refused_without_echoing_them(values, message):
    error = h.render_error(values)
    assert message in error
    assert SENTINEL not in error


def test_secret_references_render_without_values():
    values = {"storage": {"s3": S3}, "hfToken": {"existingSecret": "hf"},
              "extraEnv": [{"name": "WANDB_API_KEY",
                            "valueFrom": {"secretKeyRef": {"name": "wandb", "key": "k"}}}]}
    env = {e["name"]: e for e in _container(_pods(h.render_objects(values))[0][1])["env"]}
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"] == {
        "name": "s3-creds", "key": "AWS_ACCESS_KEY_ID"}
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "s3-creds"
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf", "key": "HF_TOKEN"}
    assert env["DMDR_S3_URI"]["value"] == "s3://bucket/prefix"


def test_irsa_uses_the_service_account_and_no_keys():
    values = h.values_file(h.CHART_DIR / "ci" / "multi-node-elastic-values.yaml")
    objects = h.render_objects(values)
    account = h.the(objects, "ServiceAccount")
    assert account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].startswith("arn:aws")
    for _, template in _pods(objects):
        assert template["spec"]["serviceAccountName"] == account["metadata"]["name"]
        names = {e["name"] for e in _container(template)["env"]}
        assert "AWS_ACCESS_KEY_ID" not in names and "AWS_SECRET_ACCESS_KEY" not in names


# --- the distributed layout and the command ------------------------------------------------

@pytest.mark.parametrize("path", VALUE_SETS)
def test_command_and_operator_env_count_processes_not_pods(path):
    values = _values(path)
    objects = h.render_objects(values)
    job = h.the(objects, "PyTorchJob")
    nproc = int(job["spec"]["nprocPerNode"])
    gpus = values.get("resources", {}).get("gpusPerPod", 8)
    assert nproc == (gpus or values["distributed"]["procsPerPod"])
    pods = sum(r["replicas"] for r in job["spec"]["pytorchReplicaSpecs"].values())
    elastic = job["spec"].get("elasticPolicy")
    for rtype, template in _pods(objects):
        container = _container(template)
        assert container["command"] == ["python", "-m", "dmdr.launch.run"]  # torchrun, exit >= 128 on SIGTERM
        grace = template["spec"]["terminationGracePeriodSeconds"]
        assert container["args"][:9] == [f"--nproc-per-node={nproc}", f"--shutdown-timeout={grace - 10}",
                                          "-m", "dmdr", "train", "--config", "/etc/dmdr/config.yaml",
                                          "--resume-ckpt", "auto"]
        if gpus:
            assert container["resources"]["limits"]["nvidia.com/gpu"] == gpus
        env = h.operator_env(job, rtype, 0)
        if elastic:
            assert set(job["spec"]["pytorchReplicaSpecs"]) == {"Worker"}
            assert env["PET_NNODES"] == f"{elastic['minReplicas']}:{elastic['maxReplicas']}"
            assert env["PET_RDZV_BACKEND"] == "c10d"
            assert env["PET_RDZV_ENDPOINT"] == f"{job['metadata']['name']}-worker-0:23456"
            assert env["PET_MAX_RESTARTS"] == str(elastic["maxRestarts"])
            assert "join_timeout=" in env["PET_RDZV_CONF"]
        else:
            assert env["WORLD_SIZE"] == str(pods * nproc)
            assert env["PET_NNODES"] == str(pods)
            assert env["PET_NPROC_PER_NODE"] == str(nproc)


def test_operator_env_is_setpodenv_of_release_1_9():
    """PYTHONUNBUFFERED=1 and PET_NPROC_PER_NODE in both modes, in every container."""
    for elastic in (True, False):
        job = h.the(h.render_objects({"elastic": {"enabled": elastic}}), "PyTorchJob")
        rtype = "Worker" if elastic else "Master"
        env = h.operator_env(job, rtype, 0)
        assert env["PYTHONUNBUFFERED"] == "1"
        assert env["PET_NPROC_PER_NODE"] == job["spec"]["nprocPerNode"] == "8"
        template = h.replica_templates(job)[rtype]
        template["spec"]["containers"].append({"name": "sidecar", "image": "busybox"})
        spec = h.operator_pod_spec(job, rtype, 0)
        for container in spec["containers"]:
            names = [e["name"] for e in container.get("env", [])]
            assert names[-len(env):] == list(env), container["name"]  # appended, in order


def test_list_map_keys_are_enforced_like_the_api_server():
    """Duplicate env names / mount paths / volume names fail at `helm install`
    ("Duplicate value"): the CRD and Pod validators here must fail the same way."""
    job = h.the(h.render_objects(), "PyTorchJob")
    spec = h.replica_templates(job)["Worker"]["spec"]
    container = spec["containers"][0]
    container["env"].append(dict(container["env"][0]))
    container["volumeMounts"].append({"name": "tmp", "mountPath": "/tmp"})
    spec["volumes"].append(dict(spec["volumes"][0]))
    if h.PYTORCHJOB_CRD.exists():
        messages = [e.message for e in h.crd_validator().iter_errors(job)]
        assert sum("Duplicate value" in m for m in messages) == 3, messages
        assert any("name=HOME" in m for m in messages) and any("mountPath=/tmp" in m for m in messages)
    with pytest.raises(AssertionError, match="Duplicate value: name=HOME"):
        h.validate_k8s(h.as_pod(h.replica_templates(job)["Worker"], "run-dmdr-worker-0"))


@pytest.mark.parametrize("values, expected", [
    pytest.param({"extraEnv": [{"name": "HOME", "value": "/x"}]}, "env HOME is set twice",
                 id="extraEnv-vs-chart"),
    pytest.param({"extraEnv": [{"name": "FOO", "value": "1"}, {"name": "FOO", "value": "2"}]},
                 "env FOO is set twice", id="extraEnv-twice"),
    pytest.param({"nccl": {"extraEnv": {"NCCL_DEBUG": "INFO"}}}, "env NCCL_DEBUG is set twice",
                 id="nccl.extraEnv-vs-chart"),
    pytest.param({"nccl": {"extraEnv": {"NCCL_X": "1"}}, "extraEnv": [{"name": "NCCL_X", "value": "2"}]},
                 "env NCCL_X is set twice", id="nccl.extraEnv-vs-extraEnv"),
    pytest.param({"extraEnv": [{"name": "PYTHONUNBUFFERED", "value": "0"}]},
                 "env PYTHONUNBUFFERED is set by the training operator", id="operator-env"),
    pytest.param({"extraVolumes": [{"name": "tmp", "emptyDir": {}}]}, "two volumes named tmp",
                 id="extraVolumes"),
    pytest.param({"extraVolumes": [{"name": "data", "emptyDir": {}}],
                  "extraVolumeMounts": [{"name": "data", "mountPath": "/tmp"}]},
                 "two volumeMounts at /tmp", id="extraVolumeMounts"),
])
def test_duplicate_list_keys_are_refused(values, expected):
    assert expected in h.render_error(values)


def test_distinct_extra_env_and_volumes_render_and_validate():
    values = {"extraEnv": [{"name": "FOO", "value": "1"}], "nccl": {"extraEnv": {"NCCL_X": "1"}},
              "extraVolumes": [{"name": "data", "emptyDir": {}}],
              "extraVolumeMounts": [{"name": "data", "mountPath": "/data"}]}
    job = h.the(h.render_objects(values), "PyTorchJob")
    if h.PYTORCHJOB_CRD.exists():
        assert not list(h.crd_validator().iter_errors(job))
    h.validate_k8s(h.as_pod(h.replica_templates(job)["Worker"], "run-dmdr-worker-0"))


def test_the_grace_period_reaches_torchrun_and_the_trainer():
    """torchrun SIGKILLs workers 30 s after SIGTERM unless told otherwise; the trainer's
    shutdown_grace must fit inside what the pod's grace period leaves."""
    objects = h.render_objects({"job": {"terminationGracePeriodSeconds": 600}})
    for _, template in _pods(objects):
        assert template["spec"]["terminationGracePeriodSeconds"] == 600
        assert "--shutdown-timeout=590" in _container(template)["args"]
    config = yaml.safe_load(h.the(objects, "ConfigMap")["data"]["config.yaml"])
    assert config["shutdown_grace"] == 580
    kept = h.render_objects({"training": {"overrides": {"shutdown_grace": 100}}})
    assert yaml.safe_load(h.the(kept, "ConfigMap")["data"]["config.yaml"])["shutdown_grace"] == 100
    error = h.render_error({"training": {"overrides": {"shutdown_grace": 290}}})
    assert "training.overrides.shutdown_grace (290 s) does not fit job.terminationGracePeriodSeconds (300 s)" in error
    assert "at most 280" in error
    assert "terminationGracePeriodSeconds" in h.render_error({"job": {"terminationGracePeriodSeconds": 20}})


def test_fixed_size_is_one_master_plus_workers():
    job = h.the(h.render_objects({"elastic": {"enabled": False}, "job": {"replicas": 3},
                                  "storage": {"s3": S3}}), "PyTorchJob")
    specs = job["spec"]["pytorchReplicaSpecs"]
    assert specs["Master"]["replicas"] == 1 and specs["Worker"]["replicas"] == 2
    assert "elasticPolicy" not in job["spec"]
    assert [h.operator_env(job, "Worker", i)["RANK"] for i in range(2)] == ["1", "2"]
    single = h.the(h.render_objects({"elastic": {"enabled": False}}), "PyTorchJob")
    assert set(single["spec"]["pytorchReplicaSpecs"]) == {"Master"}


def test_run_policy_and_scheduling():
    values = h.values_file(h.CHART_DIR / "ci" / "multi-node-elastic-values.yaml")
    job = h.the(h.render_objects(values), "PyTorchJob")
    policy = job["spec"]["runPolicy"]
    assert policy["cleanPodPolicy"] == "Running" and policy["backoffLimit"] == 10
    assert policy["schedulingPolicy"] == {"minAvailable": 2, "queue": "training",
                                          "scheduleTimeoutSeconds": 1800}
    template = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]
    assert template["schedulerName"] == "volcano"
    assert template["priorityClassName"] == "training-high"
    assert job["spec"]["pytorchReplicaSpecs"]["Worker"]["restartPolicy"] == "OnFailure"

    kueue = h.the(h.render_objects(
        h.values_file(h.CHART_DIR / "ci" / "static-exitcode-values.yaml")), "PyTorchJob")
    assert kueue["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    assert kueue["spec"]["pytorchReplicaSpecs"]["Master"]["restartPolicy"] == "ExitCode"
    assert "ttlSecondsAfterFinished" not in kueue["spec"]["runPolicy"]
    assert kueue["spec"]["runPolicy"]["activeDeadlineSeconds"] == 172800


def test_cache_pvc_is_created_and_kept():
    values = h.values_file(h.CHART_DIR / "ci" / "multi-node-elastic-values.yaml")
    objects = h.render_objects(values)
    claim = h.the(objects, "PersistentVolumeClaim")
    assert claim["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    volumes = {v["name"]: v for v in _pods(objects)[0][1]["spec"]["volumes"]}
    assert volumes["cache"]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]


def test_names_fit_dns_labels_for_long_release_names():
    release = "a" + "b" * 52  # Helm allows 53 characters
    objects = h.render_objects(release=release)
    job = h.the(objects, "PyTorchJob")["metadata"]["name"]
    assert len(f"{job}-worker-999") <= 63 and not job.endswith("-")
    for obj in objects:
        assert len(obj["metadata"]["name"]) <= 63
        assert all(len(v) <= 63 for v in obj["metadata"]["labels"].values())


def test_training_config_keeps_its_types_through_helm_and_pyyaml():
    overrides = {"max_train_steps": 1000000, "learning_rate_gen": 5e-8, "shift": 1.5,
                 "mixed_precision": "no", "use_8bit_adam": True, "magic_prompt": "Realistic: photo",
                 "sample_prompts": ["a cat", "yes"], "tiny_vae_path": None, "seed": 0}
    objects = h.render_objects({"training": {"preset": "tiny", "overrides": overrides}},
                               release="my-run")
    config = yaml.safe_load(h.the(objects, "ConfigMap")["data"]["config.yaml"])
    assert config == {"preset": "tiny", "output_dir": "/workspace/outputs",
                      "exp_name": "my-run", "shutdown_grace": 280, **overrides}
    assert type(config["learning_rate_gen"]) is float and type(config["seed"]) is int
    without_preset = h.render_objects({"training": {"preset": "", "expName": "x1"}})
    assert yaml.safe_load(h.the(without_preset, "ConfigMap")["data"]["config.yaml"]) == {
        "output_dir": "/workspace/outputs", "exp_name": "x1", "shutdown_grace": 280}


def test_notes_give_the_commands_for_this_release():
    notes = h.render({"storage": {"s3": {**S3, "uri": "s3://bucket/prefix/"}}},
                     release="run7", namespace="team")[h.render_chart.NOTES]
    assert "kubectl logs -f -n team run7-dmdr-worker-0 -c pytorch" in notes
    assert "dmdr pull s3://bucket/prefix/run7 --step latest --dest ./run7" in notes
    static = h.render({"elastic": {"enabled": False}}, release="run7")[h.render_chart.NOTES]
    assert "kubectl logs -f -n ml run7-dmdr-master-0 -c pytorch" in static
    assert "WARNING: storage.s3.uri is empty" in static


# --- bad values fail with a message naming the fix -----------------------------------------

@pytest.mark.parametrize("values, expected", [
    pytest.param({"resources": {"gpuPerPod": 8}},
                 ["/resources", "additional properties 'gpuPerPod' not allowed"], id="typo"),
    pytest.param({"trainig": {}}, ["additional properties 'trainig' not allowed"], id="top-typo"),
    pytest.param({"training": {"preset": "sdxl"}},
                 ["/training/preset", "'tiny', 'sdxl-cold-start', 'sdxl-dmdr-refl'"], id="enum"),
    pytest.param({"job": {"restartPolicy": "Always"}}, ["/job/restartPolicy", "OnFailure"],
                 id="restart-enum"),
    pytest.param({"job": {"replicas": 0}}, ["/job/replicas", "minimum"], id="range"),
    pytest.param({"storage": {"s3": {"uri": "bucket/prefix"}}}, ["/storage/s3/uri"], id="s3-uri"),
    pytest.param({"training": {"overrides": {"Max-Steps": 1}}}, ["Max-Steps"], id="override-name"),
    pytest.param({"job": {"replicas": 2}, "elastic": {"minReplicas": 3, "maxReplicas": 2}},
                 ["elastic.maxReplicas (2) is smaller than elastic.minReplicas (3)"], id="max<min"),
    pytest.param({"job": {"replicas": 5}, "elastic": {"maxReplicas": 4}},
                 ["job.replicas (5) is outside elastic.minReplicas..maxReplicas (1..4)"],
                 id="replicas-outside"),
    pytest.param({"resources": {"gpusPerPod": 0}},
                 ["distributed.backend is nccl but resources.gpusPerPod is 0"], id="nccl-no-gpu"),
    pytest.param({"distributed": {"procsPerPod": 4}},
                 ["distributed.procsPerPod (4) differs from resources.gpusPerPod (8)"],
                 id="procs-vs-gpus"),
    pytest.param({"resources": {"limits": {"nvidia.com/gpu": 4}}},
                 ["resources.gpusPerPod"], id="gpu-in-limits"),
    pytest.param({"image": {"repository": ""}}, ["image.repository is empty"], id="no-image"),
    pytest.param({"storage": {"s3": {"uri": "s3://bucket/x"}}},
                 ["storage.s3.credentials.existingSecret is empty"], id="s3-no-secret"),
    pytest.param({"storage": {"s3": {"uri": "s3://bucket/x",
                                     "credentials": {"source": "serviceAccount"}}}},
                 ["needs a service account"], id="irsa-no-sa"),
    pytest.param({"job": {"restartPolicy": "ExitCode"}},
                 ["job.restartPolicy=ExitCode recreates pods"], id="exitcode-ephemeral"),
    pytest.param({"kueue": {"queueName": "q"}, "gangScheduling": {"enabled": True}},
                 ["use one of them"], id="kueue+gang"),
    pytest.param({"job": {"replicas": 2}, "elastic": {"maxReplicas": 2},
                  "storage": {"cache": {"create": {"enabled": True,
                                                   "accessMode": "ReadWriteOnce"}}}},
                 ["ReadWriteOnce cannot be mounted by 2 pods"], id="rwo-cache"),
    pytest.param({"training": {"overrides": {"output_dir": "/data"}}},
                 ["training.overrides.output_dir is set by the chart"], id="reserved-key"),
])
def test_bad_values_fail_with_a_clear_message(values, expected):
    error = h.render_error(values)
    for part in expected:
        assert part in error, error


def test_release_names_starting_with_a_digit_are_refused():
    assert "must start with a letter" in h.render_error({}, release="7run")


# --- k8s/ examples stay what the chart renders ---------------------------------------------

def test_rendered_examples_are_up_to_date():
    values_files = sorted((h.ROOT / "k8s" / "values").glob("*.yaml"))
    assert {p.stem for p in values_files} >= {"single-node-8gpu", "multi-node", "minio"}
    rendered = {p.name for p in (h.ROOT / "k8s" / "rendered").glob("*.yaml")}
    assert rendered == {p.name for p in values_files}, "k8s/rendered has files without values"
    stale = [p.name for p in values_files
             if (h.ROOT / "k8s" / "rendered" / p.name).read_text()
             != h.render_chart.example_text(p)]
    assert not stale, f"k8s/rendered/{stale} differ from the chart: run `make k8s-examples`"


def test_example_objects_are_valid_and_hold_no_secret_values():
    secret = yaml.safe_load((h.ROOT / "k8s" / "s3-secret.example.yaml").read_text())
    secret["metadata"]["namespace"] = "ml"
    h.validate_k8s(secret)
    placeholders = list(secret["stringData"].values())
    for path in (h.ROOT / "k8s" / "rendered").glob("*.yaml"):
        text = path.read_text()
        assert not any(p in text for p in placeholders), path
        for obj in (d for d in yaml.safe_load_all(text) if d):
            if "." not in obj["apiVersion"].split("/")[0]:  # custom resources: their CRD tests
                h.validate_k8s(obj)


# --- the rendered pods rendezvous for real --------------------------------------------------

PROBE = textwrap.dedent("""
    import json, os, sys
    import torch, torch.distributed as dist
    dist.init_process_group("gloo")
    total = torch.ones(1)
    dist.all_reduce(total)
    out = sys.argv[sys.argv.index("--probe-out") + 1]
    keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK")
    record = {k: int(os.environ[k]) for k in keys}
    record.update(sum=int(total.item()), argv=sys.argv[1:])
    with open(os.path.join(out, f"rank{dist.get_rank()}.json"), "w") as f:
        json.dump(record, f)
    dist.destroy_process_group()
""")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("elastic", [True, False], ids=["elastic", "fixed"])
def test_rendered_pods_form_one_world_of_pods_times_processes(tmp_path, elastic):
    """Each rendered pod, with the operator's env, runs torchrun with a probe in place of
    `dmdr train`: every process must see WORLD_SIZE = pods x processes per pod."""
    values = h.values_file(h.CHART_DIR / "ci" / "cpu-tiny-values.yaml")
    values["elastic"]["enabled"] = elastic
    # Elastic 1..2 pods: wait long enough for the second pod on a busy machine.
    values["elastic"]["rdzvConf"] = {"last_call_timeout": 120}
    secrets = {"dmdr-s3": {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test"}}
    replicas = h.local_replicas(h.render_objects(values), tmp_path, secrets, port=_free_port())
    probe, out = tmp_path / "probe.py", tmp_path / "out"
    probe.write_text(PROBE)
    out.mkdir()
    procs = []
    for replica in replicas:
        module = replica.argv.index("dmdr") - 1  # "-m dmdr" -> the probe script
        argv = replica.argv[:module] + [str(probe)] + replica.argv[module + 2:]
        procs.append(subprocess.Popen(argv + ["--probe-out", str(out)], env=replica.env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    logs = [p.communicate(timeout=240)[0].decode(errors="replace") for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)[-4000:]

    records = [json.loads(f.read_text()) for f in sorted(out.glob("rank*.json"))]
    world = len(replicas) * 2
    assert len(records) == world
    assert {r["RANK"] for r in records} == set(range(world))
    assert all(r["WORLD_SIZE"] == world and r["sum"] == world for r in records)
    assert all(r["LOCAL_WORLD_SIZE"] == 2 for r in records)
    assert all(r["argv"][:2] == ["train", "--config"] and "auto" in r["argv"] for r in records)


# --- values.yaml is documented and matches the schema ---------------------------------------

def _schema_leaves(node: dict, prefix: str = "") -> set[str]:
    """Dotted paths of the schema's declared keys that hold a value (not a nested group)."""
    paths = set()
    for key, child in node.get("properties", {}).items():
        path = f"{prefix}{key}"
        nested = child.get("properties") and child.get("additionalProperties") is False
        paths |= _schema_leaves(child, f"{path}.") if nested else {path}
    return paths


def test_every_value_is_commented_and_declared_in_the_schema():
    schema = json.loads((h.CHART_DIR / "values.schema.json").read_text())
    leaves = _schema_leaves(schema) - {"global"}
    lines = (h.CHART_DIR / "values.yaml").read_text().splitlines()
    stack: list[tuple[int, str]] = []
    documented = set()
    for number, line in enumerate(lines):
        match = re.match(r"^( *)([A-Za-z][\w]*):", line)
        if not match:
            continue
        indent = len(match.group(1))
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = ".".join([p for _, p in stack] + [match.group(2)])
        stack.append((indent, match.group(2)))
        if path in leaves:
            assert lines[number - 1].strip().startswith("#"), f"values.yaml: {path} has no comment"
            documented.add(path)
    assert documented == leaves, f"in the schema but not in values.yaml: {leaves - documented}"
