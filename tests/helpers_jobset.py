"""The JobSet controller's objects for the chart's JobSet (launcher=jobset): what it builds.

Follows kubernetes-sigs/jobset pkg/controllers/jobset_controller.go (`constructJob`,
`genJobName`, `genSubdomain` in the versions with network.subdomain): each replicated job r is
`replicas` child Jobs "<jobset>-<r>-<jobIndex>" with the template's spec; with
network.enableDNSHostnames the pod template's subdomain is network.subdomain or the JobSet's
name (a headless Service of that name is created), so with the Job controller's hostname
"<job>-<podIndex>" (helpers_indexedjob) a pod is "<jobset>-<r>-<jobIndex>-<podIndex>.<subdomain>".
`jobset_action` reads the failure policy's rules (failure_policy.go). Restarts of the whole set
are helpers_jobset_sim.JobSetRun's.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import helpers_helm as h
import helpers_indexedjob as ij


def child_job(jobset: dict[str, Any], rjob_index: int = 0, job_index: int = 0) -> dict[str, Any]:
    """The batch/v1 Job the JobSet controller creates (labels left out)."""
    name = jobset["metadata"]["name"]
    rjob = jobset["spec"]["replicatedJobs"][rjob_index]
    spec = copy.deepcopy(rjob["template"]["spec"])
    network = jobset["spec"].get("network", {})
    if network.get("enableDNSHostnames"):
        spec["template"]["spec"]["subdomain"] = network.get("subdomain", name)
    return {"apiVersion": "batch/v1", "kind": "Job",
            "metadata": {"name": f"{name}-{rjob['name']}-{job_index}"}, "spec": spec}


def local_replicas(objects: list[dict[str, Any]], root: Path, secrets: dict[str, dict[str, str]],
                   host: str = "127.0.0.1", port: int | None = None) -> list[h.LocalReplica]:
    """The JobSet's pods (one replicated job, one Job) as local processes."""
    job = child_job(h.the(objects, "JobSet"))
    name, subdomain = job["metadata"]["name"], job["spec"]["template"]["spec"]["subdomain"]
    count = int(job["spec"]["completions"])
    hosts = {f"{name}-{i}.{subdomain}": host for i in range(count)}
    pods = []
    for index in range(count):
        replica = h.local_pod(f"{name}-{index}", ij.controller_pod_spec(job, index), "pytorch", root,
                              h.configmaps_of(objects), secrets, hosts, fields={ij.INDEX_FIELD: str(index)})
        if port is not None:
            replica.env["PET_MASTER_PORT"] = str(port)
        pods.append(replica)
    return pods


def jobset_action(jobset: dict[str, Any], reason: str) -> str:
    """The failure policy's action for a child Job that failed with `reason`."""
    for rule in jobset["spec"].get("failurePolicy", {}).get("rules", []):
        if not rule.get("onJobFailureReasons") or reason in rule["onJobFailureReasons"]:
            return rule["action"]
    return "RestartJobSet"
