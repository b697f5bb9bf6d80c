"""The TorchX component `dmdr.launch.torchx:train`: the chart's torchrun command, a Kubernetes
job spec from the real `torchx` CLI (dry run, validated against the Kubernetes schemas), and
a real local run of the tiny preset with `torchx run -s local_cwd`."""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytest.importorskip("torchx", reason="TorchX is the optional extra dmdr[torchx] (torchx-nightly)")

import helpers_helm as h  # noqa: E402
from dmdr.errors import UserError  # noqa: E402
from dmdr.launch import torchx as component  # noqa: E402
from helpers_s3 import free_port  # noqa: E402
from helpers_train import env as train_env, read_jsonl  # noqa: E402

COMPONENT = "dmdr.launch.torchx:train"
VENV_BIN = Path(sys.executable).parent
TORCHX = [str(VENV_BIN / "torchx")]


def _command(app) -> list[str]:
    """The replica's command words, as bash will run them (`exec` dropped)."""
    (role,) = app.roles
    assert role.entrypoint == "bash" and role.args[0] == "-c"
    words = shlex.split(role.args[1])
    assert words[0] == "exec"
    return words[1:]


def _flag(words: list[str], name: str) -> str:
    for i, word in enumerate(words):
        if word.startswith(f"{name}="):
            return word.split("=", 1)[1]
        if word == name:
            return words[i + 1]
    raise AssertionError(f"{name} not in {words}")


# --- the component ------------------------------------------------------------------------

def test_same_trainer_command_as_the_chart():
    chart = h.render_objects(h.values_file(h.CHART_DIR / "ci" / "cpu-tiny-values.yaml"))
    pod = h.replica_templates(h.the(chart, "PyTorchJob"))["Worker"]
    container = next(c for c in pod["spec"]["containers"] if c["name"] == "pytorch")
    chart_words = container["command"] + container["args"]

    words = _command(component.train(config="/etc/dmdr/config.yaml", nnodes="1:2", nproc_per_node=2))
    # the chart runs torchrun through dmdr.launch.run (exit 143 after SIGTERM, for the operator)
    assert words[0] == "torchrun" and chart_words[:3] == ["python", "-m", "dmdr.launch.run"]
    assert _flag(words, "--nproc-per-node") == _flag(chart_words, "--nproc-per-node") == "2"
    # from "-m dmdr" on, word for word
    assert words[words.index("dmdr") - 1:] == chart_words[chart_words.index("dmdr") - 1:]
    assert _flag(words, "--nnodes") == "1:2" and _flag(words, "--rdzv-backend") == "c10d"


def test_gpus_set_the_processes_per_node_and_args_pass_through():
    app = component.train("--exp-name", "sdxl a", preset="sdxl-cold-start", nnodes="2", gpu=8)
    words = _command(app)
    assert _flag(words, "--nproc-per-node") == "8" and _flag(words, "--nnodes") == "2:2"
    assert words[words.index("-m"):] == ["-m", "dmdr", "train", "--preset", "sdxl-cold-start",
                                         "--resume-ckpt", "auto", "--exp-name", "sdxl a"]
    (role,) = app.roles
    assert (role.num_replicas, role.min_replicas, role.resource.gpu) == (2, 2, 8)
    assert role.port_map == {"c10d": 29500}
    # as in the chart: a replaced node's agent must not wait for a stale shared store
    assert role.env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"
    # one node: torchrun picks a free rendezvous port itself
    assert _flag(_command(component.train(preset="tiny")), "--rdzv-endpoint") == "localhost:0"


def test_torchx_macros_expand_and_arguments_stay_one_word():
    from torchx.specs import macros

    (role,) = component.train("--exp-name", "a b", "--output-dir", "/out/${replica_id}", preset="tiny",
                              nnodes="2").roles
    applied = macros.Values(img_root="", app_id="app-1", replica_id="1", rank0_env="VC_DMDR_0_HOSTS").apply(role)
    words = shlex.split(applied.args[1])
    assert words[words.index("--exp-name") + 1] == "a b"
    assert words[words.index("--output-dir") + 1] == "/out/1"
    assert "--rdzv-id=app-1" in words and "${VC_DMDR_0_HOSTS:=localhost}:29500" in words


def test_s3_settings_become_the_charts_environment():
    (role,) = component.train(preset="tiny", s3_uri="s3://b/runs", s3_endpoint_url="http://minio:9000",
                              s3_region="eu-west-1", s3_path_style=True, env={"NCCL_DEBUG": "WARN"}).roles
    assert role.env == {"DMDR_S3_URI": "s3://b/runs", "DMDR_S3_PATH_STYLE": "true",
                        "AWS_ENDPOINT_URL": "http://minio:9000", "AWS_REGION": "eu-west-1",
                        "AWS_DEFAULT_REGION": "eu-west-1", "NCCL_DEBUG": "WARN"}


@pytest.mark.parametrize("kwargs, needle", [
    ({"env": {"AWS_SECRET_ACCESS_KEY": "x"}}, "--env AWS_SECRET_ACCESS_KEY: looks like a credential"),
    ({"env": {"HF_TOKEN": "x"}}, "--secrets"),
    ({"gpu": 8, "nproc_per_node": 4}, "one process per GPU"),
    ({"nnodes": "3:1"}, "1 <= MIN <= MAX"),
    ({"nnodes": "two"}, "MIN:MAX"),
    ({"s3_uri": "bucket/runs"}, "expected s3://bucket/prefix"),
])
def test_bad_arguments_fail_with_one_clear_message(kwargs, needle):
    with pytest.raises(UserError) as info:
        component.train(preset="tiny", **kwargs)
    assert needle in str(info.value)


# --- the real torchx CLI -------------------------------------------------------------------

def _torchx(args: list[str], cwd: Path, timeout: int) -> subprocess.CompletedProcess:
    """The torchx CLI with the venv's torchrun on PATH, offline, one thread per process."""
    environ = train_env(cwd, PATH=f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}")
    proc = subprocess.run(TORCHX + args, cwd=cwd, env=environ, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"torchx {' '.join(args)}:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


@pytest.mark.slow
def test_the_readmes_dryrun_command_works_without_a_cluster(tmp_path):
    """The README's `torchx run ... --dryrun` line, as written, prints the job spec here
    (no cluster, no kubeconfig): torchx-nightly needs validate_spec=False for that."""
    readme = (h.ROOT / "README.md").read_text()
    section = readme.split("### TorchX", 1)[1].split("\n## ", 1)[0]
    commands = section.split("```bash", 1)[1].split("```", 1)[0].replace("\\\n", " ").splitlines()
    (dryrun,) = [c for c in commands if c.startswith("torchx run") and "--dryrun" in c]
    words = shlex.split(dryrun)
    proc = _torchx(words[1:], tmp_path, timeout=120)
    request = yaml.safe_load(proc.stdout.split("=== SCHEDULER REQUEST ===", 1)[1])
    assert request["kind"] == "Job" and len(request["spec"]["tasks"]) == 2


@pytest.mark.slow
def test_kubernetes_dryrun_renders_valid_pods_with_secrets_by_reference(tmp_path):
    proc = _torchx(["run", "-s", "kubernetes", "--dryrun", "--workspace", "",
                    "-cfg", "queue=default,namespace=ml,validate_spec=False,service_account=dmdr",
                    COMPONENT, "--nnodes", "1:2", "--gpu", "8", "--s3_uri", "s3://bucket/runs",
                    "--secrets", "dmdr-s3,hf-token", "--mounts", "type=volume,src=dmdr-cache,dst=/home/dmdr/.cache",
                    "--", "--exp-name", "sdxl-a"], tmp_path, timeout=120)
    request = yaml.safe_load(proc.stdout.split("=== SCHEDULER REQUEST ===", 1)[1])
    assert request["kind"] == "Job" and request["apiVersion"] == "batch.volcano.sh/v1alpha1"
    tasks = request["spec"]["tasks"]
    assert [t["minAvailable"] for t in tasks] == [1, 0]  # elastic 1:2
    hosts = []
    for task in tasks:
        pod = h.as_pod(task["template"], task["name"])
        h.validate_k8s(pod)
        spec = pod["spec"]
        (container,) = spec["containers"]
        assert container["envFrom"] == [{"secretRef": {"name": "dmdr-s3"}}, {"secretRef": {"name": "hf-token"}}]
        env = {e["name"]: e["value"] for e in container["env"]}
        assert env["DMDR_S3_URI"] == "s3://bucket/runs"
        assert not any("ACCESS_KEY" in name or "TOKEN" in name for name in env)
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "8"
        assert container["securityContext"] == {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
        assert spec["securityContext"]["runAsNonRoot"] is True and spec["serviceAccountName"] == "dmdr"
        assert {"mountPath": "/dev/shm", "name": "dshm"} in container["volumeMounts"]
        assert any(v.get("persistentVolumeClaim", {}).get("claimName") == "dmdr-cache" for v in spec["volumes"])
        words = shlex.split(container["command"][2])
        assert words[:2] == ["exec", "torchrun"] and _flag(words, "--nproc-per-node") == "8"
        assert words[words.index("-m"):] == ["-m", "dmdr", "train", "--resume-ckpt", "auto", "--exp-name", "sdxl-a"]
        hosts.append(_flag(words, "--rdzv-endpoint"))
    # replica 0 hosts the store; the others find it through Volcano's host variable
    assert hosts == ["${TORCHX_RANK0_HOST:=localhost}:29500", "${VC_DMDR_0_HOSTS:=localhost}:29500"]


@pytest.mark.slow
@pytest.mark.parametrize("nnodes, procs", [("1", 2), ("2", 1)], ids=["1x2", "2x1"])
def test_local_cwd_trains_the_tiny_preset(tmp_path, nnodes, procs):
    """A real run; with 2 nodes, two torchrun agents rendezvous through replica 0's store."""
    from dmdr.models.tiny import TINY_SPEC_VERSION, build_tiny_sdxl

    out, cache = tmp_path / "runs", tmp_path / "cache"
    # Built before the job: inside it, a node whose local rank 0 is not global rank 0 saves an
    # empty text encoder (transformers 5 `save_pretrained` writes on global rank 0 only).
    build_tiny_sdxl(cache / f"tiny-sdxl-v{TINY_SPEC_VERSION}")
    _torchx(["run", "-s", "local_cwd", "--wait", "-cfg", f"log_dir={tmp_path / 'torchx-logs'}",
             COMPONENT, "--preset", "tiny", "--nnodes", nnodes, "--nproc_per_node", str(procs),
             "--rdzv_port", str(free_port()),
             "--", "--output-dir", f"{out}/node-${{replica_id}}", "--exp-name", "tx", "--cache-dir", str(cache),
             "--max-train-steps", "2", "--checkpoint-steps", "2", "--sample-steps", "2"],
            tmp_path, timeout=600)
    (run,) = [p.parent for p in out.glob("node-*/tx/log.txt")]  # written by global rank 0 only
    log = (run / "log.txt").read_text()
    assert "2 processes x batch 2 x accumulation 1 = 4 prompts per step" in log
    assert [r["step"] for r in read_jsonl(run / "loss_logs" / "loss_gen_log.jsonl")] == [1, 2]
    assert (run / "checkpoints" / "step-2.complete.json").is_file()
    assert {p.name for p in out.iterdir()} == {f"node-{i}" for i in range(int(nnodes))}
