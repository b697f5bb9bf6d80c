"""The chart's optional eval Job: rendered through Helm, validated against the Kubernetes schemas,
the training pods' image, identity and S3 credentials, and a command our own `dmdr eval` parses."""
from __future__ import annotations

import copy
import re

import pytest
import yaml

import helpers_helm as h
from dmdr import cli
from dmdr.evaluation import cli as eval_cli


@pytest.fixture(scope="module")
def values():
    return h.values_file(h.CHART_DIR / "ci" / "cpu-tiny-values.yaml")


def _with_eval(values, **knobs):
    out = copy.deepcopy(values)
    out["eval"] = {"enabled": True, **knobs}
    return out


def _eval_job(objects):
    jobs = [o for o in objects if o["kind"] == "Job" and o["metadata"]["labels"].get("app.kubernetes.io/component") == "eval"]
    assert len(jobs) == 1, [o["metadata"]["name"] for o in objects]
    return jobs[0]


def _parsed(container):
    """The container's command as the kubelet expands it ($(VAR) from its env), parsed by `dmdr`."""
    env = {e["name"]: e.get("value") for e in container["env"]}
    argv = [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], w) for w in container["command"]]
    assert argv[:3] == ["python", "-m", "dmdr"]
    return cli.build_parser().parse_args(argv[3:])


def test_eval_job_renders_valid_with_the_training_pods_identity(values):
    objects = h.render_objects(_with_eval(values))
    job = _eval_job(objects)
    h.validate_k8s(job)
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    trainer = next(iter(h.replica_templates(h.the(objects, "PyTorchJob")).values()))["spec"]
    assert container["image"] == trainer["containers"][0]["image"]
    assert pod["serviceAccountName"] == trainer["serviceAccountName"]
    secret_env = [e for e in container["env"] if "valueFrom" in e]
    assert secret_env and all(e in trainer["containers"][0]["env"] for e in secret_env)  # same Secret references
    assert not [e for e in container["env"] if "SECRET" in e["name"] and "value" in e]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1

    args = _parsed(container)
    assert args.func is eval_cli.run and args.watch and args.s3_path_style
    assert args.run == f"{values['storage']['s3']['uri']}/run" and args.metrics == "clip,hps"
    settings = eval_cli.settings_from_args(args)  # builtin:prompts resolves inside the package
    assert settings.num_images == 64 and len(settings.prompts) == 64

    notes = h.render(_with_eval(values), namespace="team")[h.render_chart.NOTES]
    assert f"kubectl logs -n team -f job/{job['metadata']['name']}" in notes
    assert not [o for o in h.render_objects(values) if o["kind"] == "Job"]  # off by default


def test_eval_job_knobs(values):
    job = _eval_job(h.render_objects(_with_eval(values, watch=False, steps="500,1000", metrics="clip,fid",
                                                refStats="/data/coco.npz", numImages=500, gpus=0,
                                                extraArgs=["--magic-prompt", "Realistic photo"],
                                                nodeSelector={"pool": "eval"}) | {"storage": {"s3": {
                                                    **values["storage"]["s3"], "uri": "s3://bkt/p/"}}}, release="r2"))
    h.validate_k8s(job)
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    args = _parsed(container)
    assert (args.watch, args.steps, args.metrics, args.ref_stats, args.num_images, args.magic_prompt) == (
        False, "500,1000", "clip,fid", "/data/coco.npz", 500, "Realistic photo")
    assert args.run == "s3://bkt/p/r2" and "nvidia.com/gpu" not in container["resources"]["limits"]
    assert pod["nodeSelector"] == {"pool": "eval"}


def test_eval_job_refuses_what_cannot_work(values):
    assert "eval.enabled needs storage.s3.uri" in h.render_error({"eval": {"enabled": True}})  # chart defaults
    assert "eval.refStats is empty" in h.render_error(_with_eval(values, metrics="clip,fid"))
    assert "/eval/metrics" in h.render_error(_with_eval(values, metrics="clip,lpips"))  # the schema
    outputs_init = {"initContainers": [{"name": "seed", "image": "busybox",
                                        "volumeMounts": [{"name": "outputs", "mountPath": "/out"}]}]}
    assert "initContainer seed mounts the volume outputs, which the eval pod does not have" in h.render_error(
        _with_eval(values) | outputs_init)


# What the eval pod takes from the training pods (values.yaml, eval) and what it leaves out.
SHARED_POD_FIELDS = ("serviceAccountName", "automountServiceAccountToken", "enableServiceLinks", "imagePullSecrets",
                     "priorityClassName", "runtimeClassName", "securityContext", "initContainers", "nodeSelector",
                     "tolerations", "affinity")
TRAINING_ONLY_FIELDS = ("hostNetwork", "dnsPolicy", "topologySpreadConstraints", "terminationGracePeriodSeconds")
MODELS_ON_A_PVC = {
    "training": {"overrides": {"pretrained_model": "/models/sdxl"}},
    "extraVolumes": [{"name": "models", "persistentVolumeClaim": {"claimName": "sdxl-models", "readOnly": True}}],
    "extraVolumeMounts": [{"name": "models", "mountPath": "/models", "readOnly": True}],
    "initContainers": [{"name": "fetch", "image": "busybox", "command": ["true"],
                        "volumeMounts": [{"name": "cache", "mountPath": "/cache"}]}],
    "imagePullSecrets": [{"name": "registry"}],
    "priorityClassName": "training", "runtimeClassName": "nvidia", "hostNetwork": True,
    "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "gpu", "operator": "In", "values": ["h100"]}]}]}}},
    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    "topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "zone", "whenUnsatisfiable": "DoNotSchedule",
                                   "labelSelector": {"matchLabels": {"app": "dmdr"}}}],
    "podSecurity": {"fsGroup": 3000, "fsGroupChangePolicy": "Always", "supplementalGroups": [2000]},
}


def _trainer_pod(objects, launcher):
    if launcher == "jobset":
        return h.the(objects, "JobSet")["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
    return next(iter(h.replica_templates(h.the(objects, "PyTorchJob")).values()))["spec"]


def _covering_mount(container, path):
    mounts = [m for m in container["volumeMounts"] if path == m["mountPath"] or path.startswith(m["mountPath"] + "/")]
    assert mounts, f"nothing is mounted at {path} in the {container['name']} container"
    return max(mounts, key=lambda m: len(m["mountPath"]))


@pytest.mark.parametrize("launcher", ["pytorchjob", "jobset"])
@pytest.mark.parametrize("cache", [{"existingClaim": "hf-cache", "subPath": "team/hf"},
                                   {"create": {"enabled": True}}], ids=["existing-claim", "created-claim"])
def test_eval_pod_finds_the_models_where_the_trainer_does(values, launcher, cache):
    """A base model on a PVC (extraVolumes) or in the shared cache is where args.json says, in the eval pod too."""
    knobs = h.render_chart.merge_values(_with_eval(values), {**copy.deepcopy(MODELS_ON_A_PVC), "launcher": launcher,
                                                             "storage": {"cache": cache}})
    objects = h.render_objects(knobs)
    job = _eval_job(objects)
    h.validate_k8s(job)
    pod, trainer = job["spec"]["template"]["spec"], _trainer_pod(objects, launcher)
    (container,) = pod["containers"]
    train_container = trainer["containers"][0]
    config = yaml.safe_load(h.the(objects, "ConfigMap")["data"]["config.yaml"])
    # dmdr eval reads the base model path and the Hugging Face cache from the run's args.json / env.
    env = {e["name"]: e.get("value") for e in container["env"]}
    for path in (config["pretrained_model"], env["HF_HOME"], "/home/dmdr/.cache/dmdr/eval"):
        mount = _covering_mount(container, path)
        assert mount == _covering_mount(train_container, path), path
        volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
        assert volume == next(v for v in trainer["volumes"] if v["name"] == mount["name"]), path
    cache_volume = next(v for v in pod["volumes"] if v["name"] == "cache")
    assert "persistentVolumeClaim" in cache_volume and "emptyDir" not in cache_volume

    for field in SHARED_POD_FIELDS:
        assert pod.get(field) == trainer.get(field), field
    assert pod["securityContext"]["fsGroup"] == 3000 and pod["initContainers"][0]["name"] == "fetch"
    for field in TRAINING_ONLY_FIELDS:
        assert field in trainer and field not in pod, field
    # One process: no rendezvous, NCCL or torchrun settings, nor the job's outputs volume.
    assert not [name for name in env if name.startswith(("PET_", "NCCL_", "TORCH_DISABLE_SHARE"))]
    assert {e["name"] for e in train_container["env"]} - set(env) and pod["restartPolicy"] == "Never"
    assert {v["name"] for v in pod["volumes"]} == {"tmp", "home", "cache", "models"}


def test_eval_pod_scheduling(values):
    """Its own nodeSelector / tolerations / affinity win over the training pods'; no gang scheduler."""
    affinity = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["eval"]}]}]}}}
    knobs = h.render_chart.merge_values(
        _with_eval(values, affinity=affinity, tolerations=[{"key": "eval", "operator": "Exists"}]),
        {**copy.deepcopy(MODELS_ON_A_PVC), "gangScheduling": {"enabled": True, "schedulerName": "volcano"}})
    objects = h.render_objects(knobs)
    pod = _eval_job(objects)["spec"]["template"]["spec"]
    assert pod["affinity"] == affinity and pod["tolerations"] == [{"key": "eval", "operator": "Exists"}]
    assert _trainer_pod(objects, "pytorchjob")["schedulerName"] == "volcano" and "schedulerName" not in pod
    knobs |= {"schedulerName": "topology-aware", "gangScheduling": {"enabled": False}}
    pod = _eval_job(h.render_objects(knobs))["spec"]["template"]["spec"]
    assert pod["schedulerName"] == "topology-aware"
