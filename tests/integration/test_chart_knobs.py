"""Chart knobs real clusters need (torchrun logging, RDMA, host network, extra containers,
envFrom, runtime class, scheduler, job metadata, volume groups and subPaths, an s3://
training.initCkpt), each rendered by Helm's engine and validated against the Pod schema and
the PyTorchJob CRD; and the values that only failed at runtime, now refused at render time."""
from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

import helpers_helm as h

S3 = {"uri": "s3://bucket/prefix", "credentials": {"existingSecret": "s3-creds"}}
KNOBS = {
    "job": {"terminationGracePeriodSeconds": 600, "labels": {"team": "vision"},
            "annotations": {"example.com/owner": "ml-platform"}},
    "torchrun": {"shutdownTimeout": 500, "logDir": "/workspace/outputs/torchrun", "tee": "3",
                 "localRanksFilter": "0"},
    "podSecurity": {"addCapabilities": ["IPC_LOCK"], "supplementalGroups": [2000],
                    "fsGroupChangePolicy": "Always"},
    "hostNetwork": True,
    "runtimeClassName": "nvidia",
    "schedulerName": "topology-aware",
    "envFrom": [{"secretRef": {"name": "wandb"}}, {"configMapRef": {"name": "site-env"}}],
    "initContainers": [
        {"name": "warm-cache", "image": "busybox:1.36", "command": ["true"],
         "volumeMounts": [{"name": "cache", "mountPath": "/cache"}]},
        {"name": "log-shipper", "image": "fluent/fluent-bit:3.0", "restartPolicy": "Always",
         "volumeMounts": [{"name": "outputs", "mountPath": "/logs", "readOnly": True}]}],
    "extraContainers": [{"name": "exporter", "image": "busybox:1.36", "command": ["true"]}],
    "storage": {"s3": S3, "outputs": {"existingClaim": "shared", "subPath": "dmdr/outputs"},
                "cache": {"existingClaim": "shared", "subPath": "dmdr/cache"}},
    "training": {"initCkpt": "s3://bucket/prefix/stage1/step-3000"},
}


def _job(values: dict) -> dict:
    return h.the(h.render_objects(values), "PyTorchJob")


def _valid(job: dict) -> None:
    if h.PYTORCHJOB_CRD.exists():
        errors = [f"{'.'.join(map(str, e.path))}: {e.message}" for e in h.crd_validator().iter_errors(job)]
        assert not errors, errors
    for rtype, template in h.replica_templates(job).items():
        h.validate_k8s(h.as_pod(template, f"run-dmdr-{rtype.lower()}-0"))


def _trainer(template: dict) -> dict:
    return next(c for c in template["spec"]["containers"] if c["name"] == "pytorch")


@pytest.mark.parametrize("elastic", [True, False], ids=["elastic", "fixed"])
def test_every_knob_renders_into_valid_pods(elastic):
    objects = h.render_objects({**KNOBS, "elastic": {"enabled": elastic}})
    job = h.the(objects, "PyTorchJob")
    _valid(job)
    assert job["metadata"]["labels"]["team"] == "vision"
    assert job["metadata"]["labels"]["app.kubernetes.io/part-of"] == "dmdr"
    assert job["metadata"]["annotations"] == {"example.com/owner": "ml-platform"}
    for template in h.replica_templates(job).values():
        spec, trainer = template["spec"], _trainer(template)
        assert "team" not in template["metadata"]["labels"]  # job-level only
        assert spec["hostNetwork"] is True and spec["dnsPolicy"] == "ClusterFirstWithHostNet"
        assert spec["runtimeClassName"] == "nvidia" and spec["schedulerName"] == "topology-aware"
        assert spec["securityContext"]["supplementalGroups"] == [2000]
        assert spec["securityContext"]["fsGroupChangePolicy"] == "Always"
        assert trainer["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["IPC_LOCK"]}
        assert trainer["securityContext"]["privileged"] is False
        assert trainer["envFrom"] == KNOBS["envFrom"]
        assert [c["name"] for c in spec["initContainers"]] == ["warm-cache", "log-shipper"]
        assert [c["name"] for c in spec["containers"]] == ["pytorch", "exporter"]
        mounts = {m["mountPath"]: m for m in trainer["volumeMounts"]}
        assert mounts["/workspace/outputs"]["subPath"] == "dmdr/outputs"
        assert mounts["/home/dmdr/.cache"]["subPath"] == "dmdr/cache"
        env = {e["name"]: e for e in trainer["env"]}
        assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "s3-creds"
    config = yaml.safe_load(h.the(objects, "ConfigMap")["data"]["config.yaml"])
    assert config["init_ckpt"] == "s3://bucket/prefix/stage1/step-3000"
    assert config["shutdown_grace"] == 490  # torchrun.shutdownTimeout - 10


def test_torchrun_takes_the_launcher_options():
    """The rendered launcher words parse with torchrun's own parser into the settings."""
    from torch.distributed.run import get_args_parser

    job = _job({**KNOBS, "torchrun": {**KNOBS["torchrun"], "tee": "", "redirects": "0:3,1:2"}})
    args = _trainer(h.replica_templates(job)["Worker"])["args"]
    parsed = get_args_parser().parse_args(args)
    assert parsed.shutdown_timeout == 500 and parsed.log_dir == "/workspace/outputs/torchrun"
    assert parsed.redirects == "0:3,1:2" and parsed.local_ranks_filter == "0"
    assert parsed.module and parsed.training_script == "dmdr"
    assert parsed.training_script_args[:3] == ["train", "--config", "/etc/dmdr/config.yaml"]


def test_defaults_keep_the_pod_as_before():
    template = h.replica_templates(_job({}))["Worker"]
    spec, trainer = template["spec"], _trainer(template)
    for key in ("hostNetwork", "dnsPolicy", "runtimeClassName", "schedulerName", "initContainers"):
        assert key not in spec, key
    assert spec["securityContext"]["fsGroup"] == 1000
    assert trainer["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert "envFrom" not in trainer and len(spec["containers"]) == 1
    assert not any(a.startswith(("--tee", "--log-dir", "--redirects")) for a in trainer["args"])
    no_fsgroup = h.replica_templates(_job({"podSecurity": {"fsGroup": None}}))["Worker"]["spec"]
    assert "fsGroup" not in no_fsgroup["securityContext"]
    assert "fsGroupChangePolicy" not in no_fsgroup["securityContext"]


def test_scheduler_name_with_and_without_gang_scheduling():
    gang = {"enabled": True, "schedulerName": "volcano"}
    assert h.replica_templates(_job({"gangScheduling": gang}))["Worker"]["spec"]["schedulerName"] == "volcano"
    same = _job({"gangScheduling": gang, "schedulerName": "volcano"})
    assert h.replica_templates(same)["Worker"]["spec"]["schedulerName"] == "volcano"


def test_init_ckpt_from_s3_without_a_store_of_the_run():
    """Stage 2 reads stage 1 from S3 while keeping its own checkpoints on a PVC: the pods
    get the S3 connection and keys, but no DMDR_S3_URI."""
    values = {"training": {"initCkpt": "s3://bucket/runs/stage1"},
              "storage": {"s3": {"endpointUrl": "http://minio:9000", "pathStyle": True,
                                 "credentials": {"existingSecret": "s3-creds"}}}}
    objects = h.render_objects(values)
    job = h.the(objects, "PyTorchJob")
    _valid(job)
    env = {e["name"]: e for e in _trainer(h.replica_templates(job)["Worker"])["env"]}
    assert "DMDR_S3_URI" not in env and env["AWS_ENDPOINT_URL"]["value"] == "http://minio:9000"
    assert env["DMDR_S3_PATH_STYLE"]["value"] == "true"
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"]["name"] == "s3-creds"
    config = yaml.safe_load(h.the(objects, "ConfigMap")["data"]["config.yaml"])
    assert config["init_ckpt"] == "s3://bucket/runs/stage1"
    local = _job({"training": {"initCkpt": "/workspace/outputs/stage1"}})
    names = {e["name"] for e in _trainer(h.replica_templates(local)["Worker"])["env"]}
    assert not names & {"AWS_ACCESS_KEY_ID", "DMDR_S3_PATH_STYLE"}


MULTI = {"job": {"replicas": 2}, "elastic": {"maxReplicas": 2}}


@pytest.mark.parametrize("values, expected", [
    pytest.param(MULTI, "the job may run 2 pods, each resuming (--resume-ckpt auto) from checkpoints "
                        "in its own emptyDir", id="multi-node-ephemeral"),
    pytest.param({"elastic": {"enabled": False}, "job": {"replicas": 3}},
                 "set storage.s3.uri, or storage.outputs.existingClaim", id="fixed-multi-node-ephemeral"),
    pytest.param({"shm": {"sizeLimit": "300Gi"}},
                 "shm.sizeLimit (300Gi) is above resources.limits.memory (256Gi)", id="shm>memory"),
    pytest.param({"shm": {"sizeLimit": "3e11"}}, "is above resources.limits.memory", id="shm-exponent"),
    pytest.param({"shm": {"sizeLimit": "9G"}, "resources": {"limits": {"memory": "8Gi"}}},
                 "shm.sizeLimit (9G) is above resources.limits.memory (8Gi)", id="shm-decimal"),
    pytest.param({"shm": {"sizeLimit": "1.1G"}, "resources": {"limits": {"memory": 1e9}}},
                 "shm.sizeLimit (1.1G) is above resources.limits.memory (1e+09)", id="memory-number"),
    pytest.param({"image": {"repository": "registry.example.com:5000/dmdr:1.2"}},
                 'image.repository "registry.example.com:5000/dmdr:1.2" already carries a tag',
                 id="repo-with-tag"),
    pytest.param({"image": {"repository": "ghcr.io/dmdr/dmdr@sha256:" + "a" * 64}},
                 "set image.repository without it", id="repo-with-digest"),
    pytest.param({"extraVolumeMounts": [{"name": "data", "mountPath": "/data"}]},
                 "container pytorch mounts a volume named data at /data, but the pod has no such volume",
                 id="mount-missing-volume"),
    pytest.param({"initContainers": [{"name": "warm", "image": "busybox",
                                      "volumeMounts": [{"name": "models", "mountPath": "/m"}]}]},
                 "container warm mounts a volume named models", id="init-mount-missing-volume"),
    pytest.param({"torchrun": {"shutdownTimeout": 295}},
                 "torchrun.shutdownTimeout (295 s) does not fit job.terminationGracePeriodSeconds (300 s)",
                 id="shutdown-timeout"),
    pytest.param({"torchrun": {"shutdownTimeout": 15}}, "set it to at least 20", id="shutdown-timeout-short"),
    pytest.param({"torchrun": {"logDir": "/var/log/torch"}},
                 "torchrun.logDir /var/log/torch is on the container's read-only root filesystem",
                 id="log-dir-read-only"),
    pytest.param({"torchrun": {"tee": "all"}}, "/torchrun/tee", id="tee-format"),
    pytest.param({"podSecurity": {"addCapabilities": ["ipc_lock"]}}, "/podSecurity/addCapabilities/0",
                 id="capability-format"),
    pytest.param({"storage": {"outputs": {"subPath": "../etc"}}}, "/storage/outputs/subPath", id="subpath-up"),
    pytest.param({"training": {"initCkpt": "bucket/stage1"}}, "/training/initCkpt", id="init-ckpt-format"),
    pytest.param({"training": {"overrides": {"init_ckpt": "s3://b/x"}}},
                 "training.overrides.init_ckpt is set by the chart: use training.initCkpt", id="init-ckpt-override"),
    pytest.param({"training": {"initCkpt": "s3://bucket/runs/stage1"}},
                 "storage.s3.credentials.existingSecret is empty", id="init-ckpt-s3-no-secret"),
    pytest.param({"gangScheduling": {"enabled": True, "schedulerName": "volcano"}, "schedulerName": "other"},
                 "schedulerName (other) and gangScheduling.schedulerName (volcano) differ", id="two-schedulers"),
])
def test_runtime_failures_are_refused_at_render_time(values, expected):
    error = h.render_error(values)
    assert expected in error, error
    if "execution error" in error:  # the chart's own refusals: one line
        assert "\n" not in error.strip(), error


@pytest.mark.parametrize("values", [
    pytest.param({**MULTI, "storage": {"s3": S3}}, id="multi-node-s3"),
    pytest.param({**MULTI, "storage": {"outputs": {"existingClaim": "shared"}}}, id="multi-node-pvc"),
    pytest.param({"shm": {"sizeLimit": "256Gi"}}, id="shm=memory"),
    pytest.param({"shm": {"sizeLimit": "500Mi"}, "resources": {"limits": {"memory": 1e9}}}, id="memory-number"),
    pytest.param({"shm": {"sizeLimit": 2**30}, "resources": {"limits": {"memory": "1Gi"}}}, id="shm-number"),
    pytest.param({"resources": {"limits": {"memory": None}}, "shm": {"sizeLimit": "1Ti"}}, id="no-memory-limit"),
    pytest.param({"image": {"repository": "registry.example.com:5000/team/dmdr"}}, id="registry-port"),
    pytest.param({"torchrun": {"logDir": "/data/logs"},
                  "extraVolumes": [{"name": "data", "emptyDir": {}}],
                  "extraVolumeMounts": [{"name": "data", "mountPath": "/data"}]}, id="log-dir-extra-mount"),
])
def test_what_works_is_not_refused(values):
    _valid(_job(values))


@pytest.mark.slow
def test_tee_and_log_dir_reach_the_worker_logs(tmp_path):
    """The rendered launcher words, run here: torchrun copies each worker's output into
    files under torchrun.logDir and still shows local rank 0 on the console."""
    values = {"resources": {"gpusPerPod": 0}, "distributed": {"backend": "gloo", "procsPerPod": 2},
              "torchrun": {"logDir": "/workspace/outputs/torchrun", "tee": "3", "localRanksFilter": "0"}}
    args = _trainer(h.replica_templates(_job(values))["Worker"])["args"]
    launcher = [a.replace("/workspace/outputs", str(tmp_path)) for a in args[:args.index("-m")]]
    script = tmp_path / "worker.py"
    script.write_text("import os\nprint('hello from local rank', os.environ['LOCAL_RANK'], flush=True)\n")
    proc = subprocess.run([sys.executable, "-m", "dmdr.launch.run", "--standalone", *launcher, str(script)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "hello from local rank 0" in proc.stdout and "local rank 1" not in proc.stdout
    logs = {p.read_text().strip() for p in (tmp_path / "torchrun").rglob("stdout.log")}
    assert logs == {"hello from local rank 0", "hello from local rank 1"}, logs
