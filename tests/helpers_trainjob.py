"""What Kubeflow Trainer v2 and JobSet make of the chart's TrainJob (launcher=trainjob).

`node_pod_spec(objects, index)` is the pod spec of training node `index` as the cluster creates
it, following kubeflow/trainer's plugins:
- the runtime's pod template: the chart's TrainingRuntime (trainjob.runtime.create), or the
  torch-distributed ClusterTrainingRuntime (shared/crds/torch-distributed-runtime.yaml) with the
  TrainJob's runtimePatches merged in (list items keyed by name, maps merged, the rest replaced);
- the TrainJob's trainer fields on the container named "node" (jobset plugin, builder.go
  `Trainer`: image, command, args, resourcesPerNode replace; env upserted by name);
- the torch plugin's env (torch/torch.go `EnforceMLPolicy`), upserted after it: PET_NNODES =
  trainer.numNodes, PET_NPROC_PER_NODE = trainer.numProcPerNode, PET_NODE_RANK from the pod's
  completion index (downward API), PET_MASTER_ADDR = "<trainjob>-node-0-0.<trainjob>" and
  PET_MASTER_PORT = 29400, plus container port 29400;
- the Job controller's completion-index annotation, which the kubelet resolves for PET_NODE_RANK.
JobSet names the JobSet after the TrainJob, the pods' hostnames "<jobset>-node-0-<index>" and
their subdomain "<jobset>" (DNS hostnames on by default, jobset_webhook.go `Default`).

`local_nodes` turns those pods into local processes (helpers_helm.local_pod), the master's DNS
name resolved to loopback and its port moved to a free one.
"""
from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import yaml

import helpers_helm as h

TRAINJOB_CRD = h.CRDS_DIR / "trainer.kubeflow.org_trainjobs.yaml"
RUNTIME_CRD = h.CRDS_DIR / "trainer.kubeflow.org_clustertrainingruntimes.yaml"
TORCH_DISTRIBUTED = h.CRDS_DIR / "torch-distributed-runtime.yaml"
VERSION = "v1alpha1"
NODE = "node"  # the trainer container and replicated job the torch plugin looks for
MASTER_PORT = 29400  # constants.ContainerTrainerPort
COMPLETION_INDEX = "metadata.annotations['batch.kubernetes.io/job-completion-index']"


def trainjob_errors(obj: dict[str, Any]) -> list[str]:
    """CRD schema errors of a TrainJob or (Cluster)TrainingRuntime (one schema for both kinds),
    plus the TrainJob's CEL rules on its name."""
    crd = TRAINJOB_CRD if obj["kind"] == "TrainJob" else RUNTIME_CRD
    errors = [f"{'.'.join(map(str, e.path))}: {e.message}"
              for e in h.crd_validator(crd, VERSION).iter_errors(obj)]
    name = obj["metadata"]["name"]
    if obj["kind"] == "TrainJob" and (len(name) > 63 or not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name)):
        errors.append(f"metadata.name {name!r} is not an RFC 1035 label of at most 63 characters")
    return errors


def master_addr(trainjob: dict[str, Any]) -> str:
    name = trainjob["metadata"]["name"]
    return f"{name}-{NODE}-0-0.{name}"


def torch_env(trainjob: dict[str, Any]) -> list[dict[str, Any]]:
    """The torch plugin's PET_* variables (the same for every node; the rank is a fieldRef)."""
    trainer = trainjob["spec"]["trainer"]
    return [
        {"name": "PET_NNODES", "value": str(trainer.get("numNodes", 1))},
        {"name": "PET_NPROC_PER_NODE", "value": str(trainer.get("numProcPerNode", "auto"))},
        {"name": "PET_NODE_RANK", "valueFrom": {"fieldRef": {"fieldPath": COMPLETION_INDEX}}},
        {"name": "PET_MASTER_ADDR", "value": master_addr(trainjob)},
        {"name": "PET_MASTER_PORT", "value": str(MASTER_PORT)},
    ]


def _upsert(items: list[dict[str, Any]], new: list[dict[str, Any]], key: str = "name") -> list:
    """apply.UpsertEnvVars and friends: replace the item of the same key in place, else append."""
    out = list(items)
    for item in new:
        at = next((i for i, old in enumerate(out) if old.get(key) == item.get(key)), None)
        if at is None:
            out.append(item)
        else:
            out[at] = item
    return out


def _merge(base: Any, patch: Any) -> Any:
    """A runtime patch over the runtime: maps merge, lists of named items merge by name."""
    if isinstance(base, dict) and isinstance(patch, dict):
        return {**base, **{k: _merge(base.get(k), v) for k, v in patch.items()}}
    if (isinstance(base, list) and isinstance(patch, list)
            and all(isinstance(i, dict) and "name" in i for i in base + patch)):
        out = list(base)
        for item in patch:
            at = next((i for i, old in enumerate(out) if old["name"] == item["name"]), None)
            if at is None:
                out.append(item)
            else:
                out[at] = _merge(out[at], item)
        return out
    return copy.deepcopy(patch)


def _runtime_pod(objects: list[dict[str, Any]], trainjob: dict[str, Any]) -> dict[str, Any]:
    ref = trainjob["spec"]["runtimeRef"]
    if ref.get("kind") == "TrainingRuntime":
        runtime = next(o for o in h.by_kind(objects, "TrainingRuntime")
                       if o["metadata"]["name"] == ref["name"])
    else:
        assert ref["name"] == "torch-distributed", f"no copy of ClusterTrainingRuntime {ref['name']}"
        runtime = yaml.safe_load(TORCH_DISTRIBUTED.read_text())
    job = next(j for j in runtime["spec"]["template"]["spec"]["replicatedJobs"] if j["name"] == NODE)
    template = copy.deepcopy(job["template"]["spec"]["template"])
    for patch in trainjob["spec"].get("runtimePatches", []):
        for rjob in patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]:
            if rjob["name"] == NODE:
                template = _merge(template, rjob["template"]["spec"]["template"])
    return template


def node_pod(objects: list[dict[str, Any]], index: int) -> dict[str, Any]:
    """Pod template (metadata + spec) of training node `index`, as created in the cluster."""
    trainjob = h.the(objects, "TrainJob")
    pod = _runtime_pod(objects, trainjob)
    trainer = trainjob["spec"]["trainer"]
    container = next(c for c in pod["spec"]["containers"] if c["name"] == NODE)
    for key, field in (("image", "image"), ("command", "command"), ("args", "args"),
                       ("resources", "resourcesPerNode")):
        if field in trainer:
            container[key] = copy.deepcopy(trainer[field])
    container["env"] = _upsert(_upsert(container.get("env", []), trainer.get("env", [])),
                               torch_env(trainjob))
    container["ports"] = _upsert(container.get("ports", []), [{"containerPort": MASTER_PORT}],
                                 key="containerPort")
    metadata = pod.setdefault("metadata", {})
    metadata.setdefault("annotations", {})["batch.kubernetes.io/job-completion-index"] = str(index)
    return pod


def _resolve_field_refs(pod: dict[str, Any]) -> None:
    """The kubelet's downward API for the completion index (the only fieldRef used here)."""
    index = pod["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"]
    for container in pod["spec"]["containers"]:
        for item in container.get("env", []):
            ref = item.get("valueFrom", {}).get("fieldRef")
            if ref:
                assert ref["fieldPath"] == COMPLETION_INDEX, ref
                item.pop("valueFrom")
                item["value"] = index


def local_node(objects: list[dict[str, Any]], index: int, root: Path,
               secrets: dict[str, dict[str, str]], port: int, suffix: str,
               host: str = "127.0.0.1") -> h.LocalReplica:
    """Node pod `index` as a local process under root/<pod>/: the pod name stands in for
    JobSet's "<hostname>-<random>" (a new suffix is a new pod: new folders, empty emptyDirs),
    the master's DNS name is `host` and its port `port` (a new master pod has a new address)."""
    trainjob = h.the(objects, "TrainJob")
    configmaps = {cm["metadata"]["name"]: cm.get("data", {}) for cm in h.by_kind(objects, "ConfigMap")}
    pod = node_pod(objects, index)
    _resolve_field_refs(pod)
    container = next(c for c in pod["spec"]["containers"] if c["name"] == NODE)
    container["env"] = _upsert(container["env"], [{"name": "PET_MASTER_PORT", "value": str(port)}])
    pod_name = f"{trainjob['metadata']['name']}-{NODE}-0-{index}-{suffix}"
    return h.local_pod(pod_name, pod["spec"], NODE, root, configmaps, secrets,
                       {master_addr(trainjob): host})


def local_nodes(objects: list[dict[str, Any]], root: Path, secrets: dict[str, dict[str, str]],
                port: int, attempt: int = 0) -> list[h.LocalReplica]:
    """Every node pod of one JobSet attempt (local_node, suffix try<attempt>)."""
    nodes = int(h.the(objects, "TrainJob")["spec"]["trainer"].get("numNodes", 1))
    return [local_node(objects, i, root, secrets, port, f"try{attempt}") for i in range(nodes)]
