"""The rendered container command under SIGTERM (a node drain, a preemption, kubectl delete).

One pod of the chart's command, with the operator's env, runs a probe in place of `dmdr train`
that needs longer than torchrun's default 30 s to flush after SIGTERM. Within the pod's grace
period the probe must finish flushing (torchrun gets the grace via --shutdown-timeout), and the
container must exit 128 + SIGTERM = 143 (torchrun alone exits 1, and restartPolicy ExitCode
retries only codes >= 128: the eviction would fail the job).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import helpers_helm as h
from helpers_s3 import free_port, listening, wait_for

pytestmark = pytest.mark.slow

GRACE = 45  # terminationGracePeriodSeconds; the probe's flush outlasts torchrun's default 30 s
FLUSH = 32

PROBE = f"""
import os, signal, sys, time
out = sys.argv[sys.argv.index("--probe-out") + 1]
def stop(signum, frame):
    time.sleep({FLUSH})  # the save and upload of a large model
    open(os.path.join(out, "flushed-" + os.environ["RANK"]), "w").close()
    sys.exit(128 + signum)
signal.signal(signal.SIGTERM, stop)
open(os.path.join(out, "ready-" + os.environ["RANK"]), "w").close()
while True:
    time.sleep(0.1)
"""


def _start(tmp_path, max_pods: int, port: int) -> tuple[subprocess.Popen, Path]:
    """worker-0 of the rendered chart (one process per pod), the probe in place of dmdr train."""
    values = h.values_file(h.CHART_DIR / "ci" / "cpu-tiny-values.yaml")
    values["job"].update(replicas=1, terminationGracePeriodSeconds=GRACE)
    values["elastic"].update(minReplicas=1, maxReplicas=max_pods, rdzvConf={"last_call_timeout": 300})
    values["distributed"]["procsPerPod"] = 1
    secrets = {"dmdr-s3": {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test"}}
    [pod] = h.local_replicas(h.render_objects(values), tmp_path / "pod", secrets, port=port)
    probe, out = tmp_path / "probe.py", tmp_path / "out"
    probe.write_text(PROBE)
    out.mkdir()
    module = pod.argv.index("dmdr") - 1  # "-m dmdr train ..." -> the probe
    argv = pod.argv[:module] + [str(probe)] + pod.argv[module + 2:] + ["--probe-out", str(out)]
    proc = subprocess.Popen(argv, env=pod.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    return proc, out


def test_sigterm_during_the_rendezvous_exits_143(tmp_path):
    """Before any worker runs (waiting for more pods), torchrun has no signal handler yet."""
    port = free_port()
    proc, out = _start(tmp_path, max_pods=2, port=port)
    try:
        wait_for(lambda: proc.poll() is None and listening(port), timeout=120, interval=0.1,
                 what="the rendezvous store")
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=30)[0].decode(errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, f"exit {proc.returncode}:\n{output[-3000:]}"
    assert not (out / "ready-0").exists()


def test_a_sigtermed_pod_flushes_within_its_grace_and_exits_143(tmp_path):
    proc, out = _start(tmp_path, max_pods=1, port=free_port())
    try:
        wait_for(lambda: proc.poll() is None and (out / "ready-0").exists(), timeout=120,
                 interval=0.1, what="the probe under the rendered command")
        proc.send_signal(signal.SIGTERM)  # the kubelet signals the container's PID 1 only
        start = time.monotonic()
        output = proc.communicate(timeout=GRACE + 30)[0].decode(errors="replace")
        took = time.monotonic() - start
    finally:
        if proc.poll() is None:
            proc.kill()
    assert (out / "flushed-0").exists(), f"worker SIGKILLed before its flush ({took:.0f}s):\n{output[-3000:]}"
    assert proc.returncode == 128 + signal.SIGTERM, f"exit {proc.returncode}:\n{output[-3000:]}"
    assert FLUSH <= took < GRACE, took  # before the kubelet's SIGKILL


@pytest.mark.parametrize("worker_exit, expected", [(2, 2), (3, 1)], ids=["usage-error", "crash"])
def test_a_usage_error_in_the_workers_is_exit_2(tmp_path, worker_exit, expected):
    """dmdr's UserError exits 2 in the workers; torchrun alone would exit 1, which the Indexed
    Job's podFailurePolicy retries. Exit 2 fails that job at once; other failures stay 1."""
    probe = tmp_path / "probe.py"
    probe.write_text(f"import sys; sys.exit({worker_exit})\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PET_")}
    proc = subprocess.run([sys.executable, "-m", "dmdr.launch.run", "--standalone", "--nproc-per-node=1",
                           "--max-restarts=0", str(probe)], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == expected, proc.stderr[-3000:]


def test_the_index_0_pod_hosts_the_c10d_store():
    """Under an Indexed Job or JobSet (JOB_COMPLETION_INDEX set) with c10d, only index 0 hosts
    the store; a user's is_host, other backends and non-indexed pods are left alone."""
    from dmdr.launch.run import store_host_conf

    def conf(**env):
        store_host_conf(env)
        return env.get("PET_RDZV_CONF")

    c10d = {"PET_RDZV_BACKEND": "c10d"}
    assert conf(**c10d, JOB_COMPLETION_INDEX="0", PET_RDZV_CONF="join_timeout=9") == "join_timeout=9,is_host=true"
    assert conf(**c10d, JOB_COMPLETION_INDEX="1") == "is_host=false"
    assert conf(**c10d, JOB_COMPLETION_INDEX="1", PET_RDZV_CONF="is_host=true") == "is_host=true"
    assert conf(**c10d) is None
    assert conf(PET_RDZV_BACKEND="static", JOB_COMPLETION_INDEX="0") is None
