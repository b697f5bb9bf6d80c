"""The chart's optional eval Job: rendered through Helm, validated against the Kubernetes schemas,
the training pods' image, identity and S3 credentials, and a command our own `dmdr eval` parses."""
from __future__ import annotations

import copy
import re

import pytest

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
