"""A JobSet of one replicated job (one Indexed Job of N pods), supervised as its controllers do.

For pods with restartPolicy Never, a Job with backoffLimit 0 and a podFailurePolicy rule
FailJob on the trainer's exit code 2 (a bad config), and a JobSet failurePolicy of maxRestarts
with one rule FailJobSet for Jobs that failed with reason PodFailurePolicy (restartStrategy
BlockingRecreate) -- what the chart's TrainingRuntime renders -- this follows:

- kubernetes/kubernetes pkg/controller/job (job_controller.go, pod_failure_policy.go): a pod
  that ends non-zero (or is killed) is a failed pod; exit 2 matches the FailJob rule and the Job
  fails with reason PodFailurePolicy, any other failure exceeds backoffLimit 0 and the Job fails
  with BackoffLimitExceeded; the failed Job's remaining pods are deleted. A Job completes when
  every index has a pod that exited 0.
- kubernetes-sigs/jobset pkg/controllers/failure_policy.go (`executeFailurePolicy`, the
  FailJobSet and RestartJobSet appliers): a failed Job matching the rule fails the JobSet; any
  other failure restarts it, or fails it (ReachedMaxRestarts) once the restarts that count
  reach maxRestarts. jobset_controller.go (`deleteJobs`, `constructJobsFromTemplate`): the
  Jobs of the previous attempt are deleted with foreground propagation (their pods get
  SIGTERM, and SIGKILL from the kubelet after the grace period) and, with BlockingRecreate,
  no Job of the new attempt is created until every old Job and pod is gone.
A pod deletion is SIGTERM to the container's PID 1, SIGKILL of its whole process tree after
the grace period. Pods are any objects with `start()`, `kill()`, `name` and `proc` (a Popen),
e.g. test_chart_pods.Pod; each attempt's pods are new pods (new emptyDirs, new addresses),
built by `make_pods(attempt)`.
"""
from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass
class Outcome:
    state: str  # Completed or Failed (the JobSet's, and so the TrainJob's, condition)
    reason: str  # AllJobsCompleted, FailJobSet, ReachedMaxRestarts
    restarts: int
    failures: list[tuple[str, int]] = field(default_factory=list)  # (pod, exit code) seen failed


def exit_code(returncode: int) -> int:
    """A container's exit code as Kubernetes reports it (killed by signal N: 128 + N)."""
    return 128 - returncode if returncode < 0 else returncode


def _until_finished(step: Callable[[], Outcome | None], timeout: float,
                    describe: Callable[[], str]) -> Outcome:
    """Reconcile every 0.2 s until the run has an outcome."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        outcome = step()
        if outcome is not None:
            return outcome
        time.sleep(0.2)
    raise AssertionError(f"the run did not finish in {timeout:.0f}s:\n{describe()}")


class JobSetRun:
    """One replicated job's pods through restarts of the whole set (see the module doc)."""

    def __init__(self, make_pods: Callable[[int], list[Any]], max_restarts: int, grace: float,
                 fail_job_exit_codes: tuple[int, ...] = (2,)):
        self.make_pods, self.max_restarts, self.grace = make_pods, max_restarts, grace
        self.fail_job_exit_codes = fail_job_exit_codes
        self.restarts = 0
        self.failures: list[tuple[str, int]] = []
        self.attempts: list[list[Any]] = []
        self._terminating: list[tuple[Any, float]] = []
        self._recreating = False

    @property
    def pods(self) -> list[Any]:
        """The current attempt's pods."""
        return self.attempts[-1]

    def start(self) -> None:
        pods = self.make_pods(self.restarts)
        self.attempts.append(pods)
        for pod in pods:
            pod.start()

    def _delete(self, pods: list[Any]) -> None:
        now = time.monotonic()
        for pod in pods:
            if pod.proc is not None and pod.proc.poll() is None:
                try:
                    os.kill(pod.proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    continue
                self._terminating.append((pod, now + self.grace))

    def _reap(self) -> None:
        """The kubelet: SIGKILL for deleted pods still running after their grace period."""
        now = time.monotonic()
        keep = []
        for pod, deadline in self._terminating:
            if pod.proc.poll() is None and now >= deadline:
                pod.kill()
            elif pod.proc.poll() is None:
                keep.append((pod, deadline))
        self._terminating = keep

    def step(self) -> Outcome | None:
        """One reconcile: the outcome once the JobSet finished, else None."""
        self._reap()
        if self._recreating:
            if not self._terminating:  # every pod of the previous attempt is gone
                self._recreating = False
                self.start()
            return None
        codes = [pod.proc.poll() for pod in self.pods]
        failed = [(pod, exit_code(c)) for pod, c in zip(self.pods, codes) if c not in (None, 0)]
        if failed:
            self.failures += [(pod.name, code) for pod, code in failed]
            self._delete(self.pods)  # the failed Job's pods, then the Job itself
            if any(code in self.fail_job_exit_codes for _, code in failed):  # PodFailurePolicy -> FailJobSet
                return Outcome("Failed", "FailJobSet", self.restarts, self.failures)
            if self.restarts >= self.max_restarts:
                return Outcome("Failed", "ReachedMaxRestarts", self.restarts, self.failures)
            self.restarts += 1
            self._recreating = True
            return None
        if all(c == 0 for c in codes):
            return Outcome("Completed", "AllJobsCompleted", self.restarts, self.failures)
        return None

    def run(self, timeout: float, describe: Callable[[], str] = lambda: "") -> Outcome:
        return _until_finished(self.step, timeout, describe)

    def stop(self) -> None:
        """Tear down: every pod of every attempt killed."""
        for pods in self.attempts:
            for pod in pods:
                pod.kill()

