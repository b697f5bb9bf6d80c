"""The Kubernetes Job controller, for the chart's Indexed Job (launcher=indexedjob).

Follows kubernetes/kubernetes pkg/controller/job (read at v1.31-v1.33):
- pod creation (job_controller.go, indexed_job_utils.go): for an Indexed Job each pod of index i
  gets the annotation batch.kubernetes.io/job-completion-index=i, the env JOB_COMPLETION_INDEX
  as a fieldRef to it (addCompletionIndexEnvVariable: appended to every container and init
  container, unless the container names it already) and hostname "<job>-<i>", so with
  spec.subdomain its DNS name is "<job>-<i>.<subdomain>";
- a failed pod is matched against spec.podFailurePolicy.rules in order, first match wins
  (pod_failure_policy.go: onExitCodes on the named container's non-zero exit code,
  onPodConditions on a condition with the given status): FailJob fails the job and deletes its
  running pods, Ignore does not count the failure, no match counts it;
- with backoffLimitPerIndex an index whose counted failures exceed it fails; with
  maxFailedIndexes 0 that fails the job. Other indexes are not touched by one index's failure;
- a failed index is recreated after getRemainingTimePerIndex (backoff_utils.go): 10 s doubled
  per earlier failure of the index, ignored ones included, at most 6 min; with
  podReplacementPolicy Failed only once the old pod is gone. The replacement is a NEW pod:
  its emptyDirs are empty;
- the job is Complete when every index has a succeeded pod (a succeeded index never runs again).
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import helpers_helm as h

INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"
INDEX_FIELD = f"metadata.annotations['{INDEX_ANNOTATION}']"
DEFAULT_BACKOFF, MAX_BACKOFF = 10.0, 360.0


def controller_pod_spec(job: dict[str, Any], index: int) -> dict[str, Any]:
    """The pod spec the Job controller creates for `index` (see the module doc)."""
    spec = copy.deepcopy(job["spec"]["template"]["spec"])
    for container in spec.get("initContainers", []) + spec["containers"]:
        env = container.setdefault("env", [])
        if not any(e["name"] == "JOB_COMPLETION_INDEX" for e in env):
            env.append({"name": "JOB_COMPLETION_INDEX", "valueFrom": {"fieldRef": {"fieldPath": INDEX_FIELD}}})
    spec.setdefault("hostname", f"{job['metadata']['name']}-{index}")
    return spec


def local_replicas(objects: list[dict[str, Any]], root: Path, secrets: dict[str, dict[str, str]],
                   host: str = "127.0.0.1", port: int | None = None) -> list[h.LocalReplica]:
    """The Indexed Job's pods as local processes (pod DNS names resolve to `host`; the
    rendezvous port may be moved to a free one)."""
    job = h.the(objects, "Job")
    name, subdomain = job["metadata"]["name"], job["spec"]["template"]["spec"]["subdomain"]
    pods = []
    for index in range(int(job["spec"]["completions"])):
        spec = controller_pod_spec(job, index)
        hosts = {f"{name}-{i}.{subdomain}": host for i in range(int(job["spec"]["completions"]))}
        replica = h.local_pod(f"{name}-{index}", spec, "pytorch", root, h.configmaps_of(objects), secrets,
                              hosts, fields={INDEX_FIELD: str(index)})
        if port is not None:
            endpoint = replica.env["PET_RDZV_ENDPOINT"]
            replica.env["PET_RDZV_ENDPOINT"] = f"{endpoint.rsplit(':', 1)[0]}:{port}"
        pods.append(replica)
    return pods


def policy_action(job: dict[str, Any], exit_code: int, conditions: set[str]) -> str:
    """FailJob, Ignore or Count for a failed pod (pod_failure_policy.go, one container)."""
    for rule in job["spec"].get("podFailurePolicy", {}).get("rules", []):
        codes = rule.get("onExitCodes")
        if codes:
            hit = exit_code in codes["values"]
            if (hit if codes["operator"] == "In" else not hit) and exit_code != 0:
                return rule["action"]
        for pattern in rule.get("onPodConditions", []):
            if pattern["type"] in conditions and pattern.get("status", "True") == "True":
                return rule["action"]
    return "Count"


@dataclass
class Index:
    """The controller's view of one completion index."""

    pod: Any  # helpers_pods.Pod
    counted: int = 0
    ignored: int = 0
    succeeded: bool = False
    failed: bool = False
    create_at: float | None = None
    exits: list[tuple[int, str]] = field(default_factory=list)  # (exit code, action)


def run_job(job: dict[str, Any], indexes: list[Index], timeout: float,
            conditions: dict[str, set[str]] | None = None) -> str:
    """Supervise the pods as the Job controller does until the job ends: returns "Complete" or
    "Failed: <why>". `conditions` maps a pod name to the conditions its next failure carries
    (e.g. DisruptionTarget for a pod whose node was lost); consumed when it fails."""
    conditions = conditions if conditions is not None else {}
    limit = int(job["spec"]["backoffLimitPerIndex"])
    max_failed = int(job["spec"].get("maxFailedIndexes", len(indexes)))
    failed_indexes = 0
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        now = time.monotonic()
        for state in indexes:
            pod = state.pod
            if state.succeeded or state.failed:
                continue
            if state.create_at is not None:
                if now >= state.create_at:  # a new pod: empty emptyDirs
                    state.create_at = None
                    pod.reschedule()
                    pod.start()
                continue
            code = pod.proc.poll()
            if code is None:
                continue
            code = 128 - code if code < 0 else code  # a container killed by signal N exits 128 + N
            if code == 0:
                state.succeeded = True
                continue
            action = policy_action(job, code, conditions.pop(pod.name, set()))
            state.exits.append((code, action))
            if action == "FailJob":
                _delete_all(indexes)
                return f"Failed: {pod.name} exited {code} (podFailurePolicy FailJob)"
            if action == "Ignore":
                state.ignored += 1
            else:
                state.counted += 1
            if state.counted > limit:
                failed_indexes += 1
                if failed_indexes > max_failed:
                    _delete_all(indexes)
                    return f"Failed: {pod.name} failed {state.counted} times (backoffLimitPerIndex {limit})"
                state.failed = True  # a failed index is never retried
                continue
            state.create_at = now + backoff(state.counted + state.ignored)
        if all(s.succeeded for s in indexes):
            return "Complete"
        time.sleep(0.2)
    raise AssertionError(f"the job did not end in {timeout:.0f}s:\n" +
                         "\n".join(f"--- {s.pod.name}\n{s.pod.output()[-3000:]}" for s in indexes))


def backoff(failures: int) -> float:
    """Seconds before an index with `failures` failures (counted + ignored) gets a new pod."""
    return min(DEFAULT_BACKOFF * 2 ** (failures - 1), MAX_BACKOFF)


def _delete_all(indexes: list[Index]) -> None:
    for state in indexes:
        state.pod.kill()
