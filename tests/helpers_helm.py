"""Test helpers for the dmdr chart: render with Helm's engine, validate, and emulate the operator.

Rendering goes through ci/render_chart.py (the code behind `make helm-template` and
`make k8s-examples`), so tests see exactly what users and the committed examples get.

`operator_env` reproduces what the Kubeflow training operator (release-1.9) adds to every
container of each replica, and `local_replicas` turns a rendered PyTorchJob into
local processes (hosts resolved to loopback, volumes to folders), for tests that run the pods.
"""
from __future__ import annotations

import copy
import functools
import importlib.util
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART_DIR = ROOT / "charts" / "dmdr"
CI_VALUES = sorted((CHART_DIR / "ci").glob("*.yaml"))
# CI clones the repository with shared/ beside it.
CRDS_DIR = ROOT.parent / "shared" / "crds"
PYTORCHJOB_CRD = CRDS_DIR / "kubeflow.org_pytorchjobs.yaml"
K8S_VERSION = "1.31.0"


def load_ci_script(name: str):
    """The module ci/<name>.py (the ci/ scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "ci" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(name, module)
    spec.loader.exec_module(module)
    return module


render_chart = load_ci_script("render_chart")


def render(values: dict[str, Any] | None = None, release: str = "run",
           namespace: str = "ml") -> dict[str, str]:
    """Template path -> rendered text (NOTES.txt included), via Helm's engine."""
    return render_chart.render(values, release=release, namespace=namespace)


def render_objects(values: dict[str, Any] | None = None, release: str = "run",
                   namespace: str = "ml") -> list[dict[str, Any]]:
    """Every rendered Kubernetes object, parsed."""
    rendered = render(values, release, namespace)
    return [doc for path, text in rendered.items() if path != render_chart.NOTES
            for doc in yaml.safe_load_all(text) if doc]


def render_error(values: dict[str, Any], release: str = "run") -> str:
    """The message Helm gives for values that must be refused (fails if rendering works)."""
    try:
        render(values, release)
    except render_chart.helm.HelmError as exc:
        return str(exc)
    raise AssertionError(f"rendering succeeded but should have failed for {values!r}")


def values_file(path: Path) -> dict[str, Any]:
    return render_chart.load_values([path])


def by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [obj for obj in objects if obj.get("kind") == kind]


def the(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = by_kind(objects, kind)
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def replica_templates(job: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Replica type (Master/Worker) -> pod template of a PyTorchJob."""
    return {rtype: spec["template"] for rtype, spec in job["spec"]["pytorchReplicaSpecs"].items()}


def as_pod(template: dict[str, Any], name: str) -> dict[str, Any]:
    """A pod template as a Pod object, for the Kubernetes schemas."""
    metadata = {**copy.deepcopy(template.get("metadata", {})), "name": name}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": template["spec"]}


def _list_map_keys(validator, keys, instance, schema):
    """`x-kubernetes-list-type: map`: no two items may share the key fields (the API server's
    "Duplicate value"), e.g. two env vars of one name or two mounts at one path. A key field
    left out counts with its schema default (a port's protocol is TCP)."""
    if schema.get("x-kubernetes-list-type") != "map" or not validator.is_type(instance, "array"):
        return
    fields = schema.get("items", {}).get("properties", {})
    seen: dict[tuple, int] = {}
    for i, item in enumerate(instance):
        if not isinstance(item, dict):
            continue
        key = tuple(item.get(k, fields.get(k, {}).get("default")) for k in keys)
        if key in seen:
            shown = ", ".join(f"{k}={v}" for k, v in zip(keys, key))
            yield jsonschema.ValidationError(
                f"Duplicate value: {shown} (items {seen[key]} and {i}; keys {list(keys)})")
        seen.setdefault(key, i)


_LIST_MAP = {"x-kubernetes-list-map-keys": _list_map_keys}


def validate_k8s(obj: dict[str, Any]) -> None:
    """Strict Kubernetes OpenAPI validation (unknown fields are errors), plus the list-map
    keys the schemas declare (kubernetes_validate ignores them): duplicate env names,
    volume names, mount paths or container ports are errors, as at the API server."""
    kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    errors = list(_k8s_validator(obj["apiVersion"], obj["kind"]).iter_errors(obj))
    if errors:
        raise AssertionError("; ".join(f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors))


@functools.lru_cache(maxsize=None)
def _k8s_validator(api_version: str, kind: str) -> jsonschema.Validator:
    from kubernetes_validate.utils import schema_contents
    from referencing import Registry, Resource

    folder = f"kubernetes-json-schema/v{K8S_VERSION}-local-strict"
    group = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
    schema = schema_contents(f"{folder}/{kind.lower()}-{group}.json", K8S_VERSION)
    definitions = schema_contents(f"{folder}/_definitions.json", K8S_VERSION)
    registry = Resource.from_contents(definitions) @ (Resource.from_contents(schema) @ Registry())
    cls = jsonschema.validators.extend(jsonschema.Draft202012Validator, _LIST_MAP)
    return cls(schema, registry=registry)


def _structural(schema: Any) -> Any:
    """A CRD's OpenAPI v3 schema as plain JSON Schema, with the API server's strictness:
    unknown fields are errors unless x-kubernetes-preserve-unknown-fields, nullable allows null,
    list-map keys are kept (crd_validator enforces them) and list-type set means unique items.
    """
    if isinstance(schema, list):
        return [_structural(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: _structural(value) for key, value in schema.items()
           if not key.startswith("x-kubernetes-") and key not in ("nullable", "format", "properties")}
    if "properties" in schema:  # property names are not keywords; each child converted once
        out["properties"] = {k: _structural(v) for k, v in schema["properties"].items()}
    if schema.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if (out.get("type") == "object" and "properties" in out
            and not schema.get("x-kubernetes-preserve-unknown-fields")):
        out.setdefault("additionalProperties", False)
    if schema.get("x-kubernetes-list-type") == "map":
        out["x-kubernetes-list-type"] = "map"
        out["x-kubernetes-list-map-keys"] = schema["x-kubernetes-list-map-keys"]
    elif schema.get("x-kubernetes-list-type") == "set":
        out["uniqueItems"] = True
    return out


@functools.lru_cache(maxsize=None)
def crd_validator(crd_path: Path = PYTORCHJOB_CRD, version: str = "v1") -> jsonschema.Validator:
    """A validator for one version of a CRD file's openAPIV3Schema (parsed once)."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    crd = next(doc for doc in yaml.load_all(crd_path.read_text(), Loader=loader) if doc)
    served = next(v for v in crd["spec"]["versions"] if v["name"] == version)
    schema = _structural(served["schema"]["openAPIV3Schema"])
    return jsonschema.validators.extend(jsonschema.Draft7Validator, _LIST_MAP)(schema)


# --- what the training operator injects -------------------------------------------------

def _port(job: dict[str, Any], rtype: str) -> int:
    for container in replica_templates(job)[rtype]["spec"]["containers"]:
        if container["name"] == "pytorch":
            for port in container.get("ports", []):
                if port.get("name") == "pytorchjob-port":
                    return int(port["containerPort"])
    raise AssertionError(f"{rtype}: no container port named pytorchjob-port")


def operator_env(job: dict[str, Any], rtype: str, index: int) -> dict[str, str]:
    """Env the training operator appends to EVERY container of replica rtype-index.

    Follows `setPodEnv` of kubeflow/training-operator release-1.9
    (pkg/controller.v1/pytorch/envvar.go) with its master and elastic generators
    (master.go, elastic.go): PYTHONUNBUFFERED=1; with a Master replica MASTER_*/PET_MASTER_*,
    WORLD_SIZE = all replicas x nprocPerNode, RANK and PET_NODE_RANK (workers offset by one);
    PET_NNODES "min:max" in elastic mode (from the elastic generator), else the replica
    count; PET_NPROC_PER_NODE = spec.nprocPerNode in both modes. The operator appends after
    the container's own env, so on a duplicate name its value is the one the process sees.
    (The copies of envvar.go read for this, commit 5fa872ff and one a little later, predate
    release-1.9: they still set PYTHONUNBUFFERED=0 and PET_NPROC_PER_NODE with a Master only;
    the two release-1.9 differences are taken from its changelog as reported in issue 11.)
    """
    spec = job["spec"]
    name = job["metadata"]["name"]
    replicas = {rt: int(rs.get("replicas", 1)) for rt, rs in spec["pytorchReplicaSpecs"].items()}
    total = sum(replicas.values())
    nproc_raw = str(spec.get("nprocPerNode", "auto"))  # the operator's webhook defaults it to auto
    nproc = int(nproc_raw) if nproc_raw.isdigit() else 1
    env = {"PYTHONUNBUFFERED": "1"}
    if "Master" in replicas:
        port = str(_port(job, "Master"))
        rank = index + 1 if rtype == "Worker" else index
        env.update({
            "MASTER_PORT": port, "MASTER_ADDR": f"{name}-master-0",
            "PET_MASTER_PORT": port, "PET_MASTER_ADDR": f"{name}-master-0",
            "WORLD_SIZE": str(total * nproc), "RANK": str(rank), "PET_NODE_RANK": str(rank),
        })
    elastic = spec.get("elasticPolicy")
    if elastic is None:
        env["PET_NNODES"] = str(total)
    else:
        env.update(_elastic_env(job, elastic, replicas))
    env["PET_NPROC_PER_NODE"] = nproc_raw
    return env


def _elastic_env(job: dict[str, Any], elastic: dict[str, Any],
                 replicas: dict[str, int]) -> dict[str, str]:
    """The elastic generator's variables (elastic.go)."""
    name = job["metadata"]["name"]
    env = {}
    host = elastic.get("rdzvHost", f"{name}-worker-0")
    env["PET_RDZV_ENDPOINT"] = f"{host}:{elastic.get('rdzvPort', _port(job, 'Worker'))}"
    env["PET_RDZV_BACKEND"] = elastic.get("rdzvBackend", "c10d")
    if "minReplicas" in elastic or "maxReplicas" in elastic:
        env["PET_NNODES"] = f"{elastic['minReplicas']}:{elastic['maxReplicas']}"
    else:
        env["PET_NNODES"] = str(replicas["Worker"])
    if "maxRestarts" in elastic:
        env["PET_MAX_RESTARTS"] = str(elastic["maxRestarts"])
    if "rdzvId" in elastic:
        env["PET_RDZV_ID"] = elastic["rdzvId"]
    if elastic.get("rdzvConf"):
        env["PET_RDZV_CONF"] = ",".join(f"{c['key']}={c['value']}" for c in elastic["rdzvConf"])
    if elastic.get("standalone"):
        env["PET_STANDALONE"] = ""
    return env


def operator_pod_spec(job: dict[str, Any], rtype: str, index: int) -> dict[str, Any]:
    """The pod spec the operator creates for rtype-index: the template's spec with
    operator_env appended to every container (init containers are left alone, as setPodEnv
    loops over Spec.Containers only)."""
    spec = copy.deepcopy(replica_templates(job)[rtype]["spec"])
    extra = [{"name": k, "value": v} for k, v in operator_env(job, rtype, index).items()]
    for container in spec["containers"]:
        container["env"] = list(container.get("env", [])) + extra
    return spec


# --- the rendered pods as local processes ------------------------------------------------

@dataclass
class LocalReplica:
    """One pod of the job as a local process: argv, full environment and its folders."""

    name: str
    argv: list[str]
    env: dict[str, str]
    mounts: dict[str, Path] = field(default_factory=dict)


def _rewrite(text: str, mounts: dict[str, Path]) -> str:
    """Replace mount paths by their local folders in one pass (longest mount wins)."""
    if not mounts:
        return text
    alternatives = "|".join(re.escape(m) for m in sorted(mounts, key=len, reverse=True))
    pattern = re.compile(rf"(?<![\w./-])({alternatives})(?=/|$|[\s\"',:])", re.MULTILINE)
    return pattern.sub(lambda match: str(mounts[match.group(1)]), text)


def local_replicas(objects: list[dict[str, Any]], root: Path,
                   secrets: dict[str, dict[str, str]] | None = None,
                   host: str = "127.0.0.1", port: int | None = None) -> list[LocalReplica]:
    """The PyTorchJob's pods as local processes under root/<pod name>/.

    Pod DNS names become `host`, every volume mount a folder (the ConfigMap's files written
    into it, their mount paths rewritten), `secretKeyRef` values come from `secrets`, the
    rendezvous port can be moved to a free one, and `python` is this interpreter.
    """
    job = copy.deepcopy(the(objects, "PyTorchJob"))
    configmaps = configmaps_of(objects)
    if port is not None:
        for template in replica_templates(job).values():
            for container in template["spec"]["containers"]:
                for p in container.get("ports", []):
                    if p.get("name") == "pytorchjob-port":
                        p["containerPort"] = port
    name = job["metadata"]["name"]
    pods = []
    for rtype, rspec in job["spec"]["pytorchReplicaSpecs"].items():
        for index in range(int(rspec.get("replicas", 1))):
            pods.append(_local_pod(job, rtype, index, root, configmaps, secrets or {}, host, name))
    return pods


def _local_pod(job, rtype, index, root, configmaps, secrets, host, job_name) -> LocalReplica:
    spec = operator_pod_spec(job, rtype, index)
    hosts = {f"{job_name}-master-0": host, f"{job_name}-worker-0": host}
    return local_pod(f"{job_name}-{rtype.lower()}-{index}", spec, "pytorch", root, configmaps,
                     secrets, hosts)


def configmaps_of(objects: list[dict[str, Any]]) -> dict[str, dict[str, str]]:
    return {cm["metadata"]["name"]: cm.get("data", {}) for cm in by_kind(objects, "ConfigMap")}


def local_pod(pod_name: str, spec: dict[str, Any], container_name: str, root: Path,
              configmaps: dict[str, dict[str, str]], secrets: dict[str, dict[str, str]],
              hosts: dict[str, str], fields: dict[str, str] | None = None) -> LocalReplica:
    """One pod spec (as its controller creates it) as a local process under root/<pod_name>/:
    each mount a folder, `hosts` (DNS name -> address) replaced in env values, `fieldRef` env
    from `fields` (fieldPath -> value)."""
    container = next(c for c in spec["containers"] if c["name"] == container_name)
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    mounts: dict[str, Path] = {}
    # Parents first, so a mount inside another (/home/dmdr/.cache in /home/dmdr) becomes the
    # same sub-folder of its parent's folder, as the path resolves inside the container.
    for mount in sorted(container.get("volumeMounts", []), key=lambda m: m["mountPath"].count("/")):
        path = mount["mountPath"].rstrip("/")
        parent = max((m for m in mounts if path.startswith(m + "/")), key=len, default=None)
        folder = (mounts[parent] / path[len(parent) + 1:] if parent
                  else root / pod_name / mount["name"])
        folder.mkdir(parents=True, exist_ok=True)
        mounts[mount["mountPath"]] = folder
    for mount in container.get("volumeMounts", []):
        source = volumes[mount["name"]].get("configMap")
        if source:
            for key, text in configmaps[source["name"]].items():
                (mounts[mount["mountPath"]] / key).write_text(_rewrite(text, mounts))

    env = {k: os.environ[k] for k in ("PATH", "LANG", "PYTHONPATH") if k in os.environ}
    for item in container.get("env", []):  # in order: a later duplicate wins, as in a pod
        if "value" in item:
            value = str(item["value"])
            for name in sorted(hosts, key=len, reverse=True):  # pod DNS -> host (longest first)
                value = value.replace(name, hosts[name])
            env[item["name"]] = _rewrite(value, mounts)
        elif "fieldRef" in item["valueFrom"]:
            env[item["name"]] = (fields or {})[item["valueFrom"]["fieldRef"]["fieldPath"]]
        else:
            ref = item["valueFrom"]["secretKeyRef"]
            try:
                env[item["name"]] = secrets[ref["name"]][ref["key"]]
            except KeyError:
                raise AssertionError(f"{pod_name}: env {item['name']} needs Secret "
                                     f"{ref['name']} key {ref['key']}") from None

    command = container["command"] + container.get("args", [])
    argv = [_rewrite(arg, mounts) for arg in command]  # container paths -> this pod's folders
    if argv[0] == "python":  # this interpreter, wherever it lives (after the rewrite: /tmp may be a mount)
        argv = [sys.executable] + argv[1:]
    return LocalReplica(pod_name, argv, env, mounts)
