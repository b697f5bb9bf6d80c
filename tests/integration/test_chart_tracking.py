"""The chart's `tracking` block: the trainer gets --report-to and the names through its ConfigMap,
the tracker servers as env, and API keys only as secretKeyRef; the pods stay valid Kubernetes and
PyTorchJob objects; bad combinations fail with one line naming the fix."""
from __future__ import annotations

import pytest
import yaml

import helpers_helm as h

SENTINEL = "wandb-key-SENTINEL-0451"
TRACKING = {"tracker": "all", "project": "sdxl", "runName": "try-3",
            "wandb": {"apiKeySecret": "wandb", "apiKeyKey": "api-key", "baseUrl": "https://wandb.example.com"},
            "mlflow": {"trackingUri": "http://mlflow.mlops:5000", "tokenSecret": "mlflow", "tokenKey": "token"}}


def _objects(values: dict):
    return h.render_objects({"training": {"preset": "tiny"}, **values}, release="run")


def test_tracking_reaches_the_trainer_config_and_the_pod_env():
    objects = _objects({"tracking": TRACKING})
    config = yaml.safe_load(h.the(objects, "ConfigMap")["data"]["config.yaml"])
    assert {k: config[k] for k in ("report_to", "tracker_project", "tracker_run_name")} == {
        "report_to": "all", "tracker_project": "sdxl", "tracker_run_name": "try-3"}
    job = h.the(objects, "PyTorchJob")
    for rtype, template in h.replica_templates(job).items():
        h.validate_k8s(h.as_pod(template, f"run-dmdr-{rtype.lower()}-0"))
        (container,) = [c for c in template["spec"]["containers"] if c["name"] == "pytorch"]
        env = {e["name"]: e for e in container["env"]}
        assert env["WANDB_API_KEY"] == {"name": "WANDB_API_KEY",
                                        "valueFrom": {"secretKeyRef": {"name": "wandb", "key": "api-key"}}}
        assert env["MLFLOW_TRACKING_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "mlflow", "key": "token"}
        assert env["WANDB_BASE_URL"]["value"] == "https://wandb.example.com"
        assert env["MLFLOW_TRACKING_URI"]["value"] == "http://mlflow.mlops:5000"
    if h.PYTORCHJOB_CRD.exists():
        assert not list(h.crd_validator().iter_errors(job))


def test_no_tracking_adds_nothing():
    objects = _objects({})
    config = yaml.safe_load(h.the(objects, "ConfigMap")["data"]["config.yaml"])
    assert not {"report_to", "tracker_project", "tracker_run_name"} & set(config)
    for template in h.replica_templates(h.the(objects, "PyTorchJob")).values():
        names = {e["name"] for c in template["spec"]["containers"] for e in c.get("env", [])}
        assert not {n for n in names if n.startswith(("WANDB_", "MLFLOW_"))}


@pytest.mark.parametrize("values, expected", [
    pytest.param({"tracking": {"tracker": "wandb"}},
                 "tracking.tracker names wandb but tracking.wandb.apiKeySecret is empty", id="wandb-no-key"),
    pytest.param({"tracking": {"tracker": "comet"}}, "/tracking/tracker", id="unknown-tracker"),
    pytest.param({"tracking": {"wandb": {"apiKey": SENTINEL}}}, "additional properties 'apiKey' not allowed",
                 id="literal-key"),
    pytest.param({"tracking": {"mlflow": {"trackingUri": f"https://user:{SENTINEL}@mlflow.example.com"}}},
                 "tracking.mlflow.trackingUri carries credentials", id="password-in-uri"),
    pytest.param({"training": {"overrides": {"report_to": "wandb"}}},
                 "training.overrides.report_to is set by the chart: use tracking.tracker", id="override"),
])
def test_bad_tracking_values_fail_with_a_clear_message(values, expected):
    error = h.render_error(values)
    assert expected in error, error
    assert SENTINEL not in error


@pytest.mark.parametrize("values", [
    {"extraEnv": [{"name": "WANDB_MODE", "value": "offline"}]},
    {"envFrom": [{"secretRef": {"name": "team-wandb"}}]},  # WANDB_API_KEY from a whole Secret
], ids=["offline", "envFrom"])
def test_wandb_key_from_elsewhere_is_accepted(values):
    objects = _objects({"tracking": {"tracker": "tensorboard,wandb"}, **values})
    config = yaml.safe_load(h.the(objects, "ConfigMap")["data"]["config.yaml"])
    assert config["report_to"] == "tensorboard,wandb"
