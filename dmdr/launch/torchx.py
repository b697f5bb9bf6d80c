"""TorchX component: DMDR training with the same torchrun command as the Helm chart.

    # the tiny preset on this machine, 1 node x 2 processes
    torchx run -s local_cwd dmdr.launch.torchx:train --preset tiny --nproc_per_node 2 \\
        -- --max-train-steps 4 --output-dir /tmp/dmdr-runs

    # the Kubernetes job spec (Volcano) for 2 nodes x 8 GPUs, S3 keys from a Secret
    torchx run -s kubernetes --dryrun -cfg queue=default,namespace=ml dmdr.launch.torchx:train \\
        --nnodes 2 --gpu 8 --s3_uri s3://bucket/runs --secrets dmdr-s3 -- --exp-name sdxl-a

Every replica runs ``torchrun --nnodes MIN:MAX --nproc-per-node N --rdzv-backend c10d
--rdzv-endpoint <replica 0>:PORT ... -m dmdr train [--preset P] [--config C] --resume-ckpt auto
[args]``: a restarted or resubmitted job resumes from its newest complete checkpoint.

Credentials never go into the job spec: ``secrets`` names Kubernetes Secrets whose keys become
environment variables (``envFrom``, e.g. AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY as in
k8s/s3-secret.example.yaml); with ``-s kubernetes -cfg service_account=NAME`` a service
account bound to a cloud role (IRSA, workload identity) needs none. Local runs inherit the
submitting shell's environment. `env` refuses names that look like credentials.
"""
# No `from __future__ import annotations`: TorchX reads the parameter types at run time.
import re
import shlex
from importlib.metadata import PackageNotFoundError, version

import torchx.specs as specs
from torchx.specs import macros
from torchx.specs.overlays import JOIN, set_overlay

from dmdr.errors import UserError

try:
    _VERSION = version("dmdr")
except PackageNotFoundError:  # a source tree that is not installed
    _VERSION = "latest"

DEFAULT_IMAGE = f"ghcr.io/dmdr/dmdr:{_VERSION}"
ROLE = "dmdr"
# The image's non-root user (docker/Dockerfile: USER 1000:1000).
RUN_AS = 1000
# The same rule as the chart's extraEnv check: job specs are plain text.
_CREDENTIAL = re.compile(r"(?i)((^|_)(TOKEN|SECRET|PASSWORD|PASSWD|PASSPHRASE|CREDENTIALS?|APIKEY)"
                         r"(_|$)|ACCESS_KEY|SECRET_KEY|API_KEY|PRIVATE_KEY)")


class _Raw(str):
    """A command word that bash must expand (not quoted)."""


def parse_nnodes(nnodes: str) -> tuple[int, int]:
    """``"2"`` -> (2, 2); ``"1:4"`` -> (1, 4) (elastic: training runs with 1 to 4 nodes)."""
    match = re.fullmatch(r"\s*(\d+)\s*(?::\s*(\d+)\s*)?", nnodes)
    if not match:
        raise UserError(f"--nnodes {nnodes!r}: give a node count (2) or an elastic range MIN:MAX (1:4)")
    low = int(match.group(1))
    high = int(match.group(2) or low)
    if not 1 <= low <= high:
        raise UserError(f"--nnodes {nnodes!r}: need 1 <= MIN <= MAX")
    return low, high


def torchrun_command(train_args: list[str], low: int, high: int, nproc_per_node: int, rdzv_port: int,
                     max_restarts: int, rdzv_conf: str | None) -> list[str]:
    """The torchrun command line of one replica on `low`..`high` nodes (words; the rendezvous
    host is left to bash)."""
    if high == 1:  # one node: torchrun picks a free port, several local jobs can coexist
        endpoint = "localhost:0"
    else:  # the scheduler names replica 0's host in ${rank0_env} (Volcano: VC_DMDR_0_HOSTS)
        endpoint = _Raw(f"$${{{macros.rank0_env}:=localhost}}:{rdzv_port}")
    cmd = ["torchrun", f"--nnodes={low}:{high}", f"--nproc-per-node={nproc_per_node}",
           "--rdzv-backend=c10d", "--rdzv-endpoint", endpoint, f"--rdzv-id={macros.app_id}",
           f"--max-restarts={max_restarts}"]
    if rdzv_conf:
        cmd += [f"--rdzv-conf={rdzv_conf}"]
    return cmd + ["-m", "dmdr", "train", *train_args]


def _bash(words: list[str]) -> str:
    """`exec` so torchrun gets the pod's SIGTERM itself (the trainer saves and flushes)."""
    return "exec " + " ".join(w if isinstance(w, _Raw) else shlex.quote(w) for w in words)


def _check_env(env: dict[str, str]) -> dict[str, str]:
    for name in env:
        if _CREDENTIAL.search(name):
            raise UserError(
                f"--env {name}: looks like a credential, and TorchX writes env values into the job "
                "spec in plain text; put it in a Kubernetes Secret and pass --secrets SECRET_NAME "
                "(or export it in the shell for -s local_cwd)")
    return dict(env)


def _s3_env(s3_uri: str | None, s3_endpoint_url: str | None, s3_region: str | None,
            s3_path_style: bool) -> dict[str, str]:
    """The chart's S3 variables (dmdr reads DMDR_S3_*, boto3 the AWS_* ones)."""
    env: dict[str, str] = {}
    if s3_uri:
        if not s3_uri.startswith("s3://"):
            raise UserError(f"--s3_uri {s3_uri!r}: expected s3://bucket/prefix")
        env.update(DMDR_S3_URI=s3_uri, DMDR_S3_PATH_STYLE=str(s3_path_style).lower())
    if s3_endpoint_url:
        env["AWS_ENDPOINT_URL"] = s3_endpoint_url
    if s3_region:
        env.update(AWS_REGION=s3_region, AWS_DEFAULT_REGION=s3_region)
    return env


def _kubernetes_overlay(role: specs.Role, secrets: list[str]) -> None:
    """Secrets as envFrom and the chart's container hardening, merged into every replica's pod.

    TorchX names each replica's container differently, so the overlay matches the container by
    its image (the role has one).
    """
    container: dict = {
        "image": role.image,
        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
    }
    if secrets:
        container["envFrom"] = [{"secretRef": {"name": name}} for name in secrets]
    set_overlay(role, "kubernetes", "V1Pod", {"spec": {
        JOIN("containers", on="image"): [container],
        "securityContext": {"runAsNonRoot": True, "runAsUser": RUN_AS, "runAsGroup": RUN_AS,
                            "fsGroup": RUN_AS, "seccompProfile": {"type": "RuntimeDefault"}},
        "enableServiceLinks": False,
        "automountServiceAccountToken": False,
    }})


def train(
    *args: str,
    preset: str | None = None,
    config: str | None = None,
    image: str = DEFAULT_IMAGE,
    nnodes: str = "1",
    nproc_per_node: int = 0,
    cpu: int = 8,
    gpu: int = 0,
    memMB: int = 32768,
    h: str | None = None,
    s3_uri: str | None = None,
    s3_endpoint_url: str | None = None,
    s3_region: str | None = None,
    s3_path_style: bool = False,
    secrets: list[str] | None = None,
    env: dict[str, str] | None = None,
    mounts: list[str] | None = None,
    rdzv_port: int = 29500,
    rdzv_conf: str | None = "join_timeout=1800,read_timeout=600",
    max_restarts: int = 3,
    max_retries: int = 0,
    name: str = "dmdr",
) -> specs.AppDef:
    """DMDR training under torchrun on every node; resumes from the newest checkpoint.

    Args:
        args: extra `dmdr train` flags, e.g. --exp-name run1 --max-train-steps 4001; TorchX
            macros such as ${replica_id} are expanded (write $$ for a literal $)
        preset: trainer preset (tiny, sdxl-cold-start, sdxl-dmdr-refl)
        config: YAML file of trainer options inside the container (e.g. a mounted ConfigMap)
        image: container image (-s local_cwd ignores it and runs from this directory)
        nnodes: nodes: a count (2) or an elastic range MIN:MAX (1:4)
        nproc_per_node: processes per node; 0: one per GPU, or 1 without GPUs
        cpu: CPUs per node
        gpu: GPUs per node
        memMB: memory per node in MB
        h: a TorchX named resource (replaces cpu, gpu and memMB)
        s3_uri: s3://bucket/prefix for checkpoints, samples and logs (DMDR_S3_URI)
        s3_endpoint_url: S3 endpoint for MinIO, Ceph, R2 (AWS_ENDPOINT_URL)
        s3_region: AWS_REGION
        s3_path_style: path-style S3 addressing (most MinIO/Ceph setups)
        secrets: Kubernetes Secrets whose keys become env vars (envFrom), e.g. dmdr-s3
        env: extra environment variables (NAME=value,...); no credentials
        mounts: type=volume,src=PVC,dst=/path or type=bind,src=/host,dst=/path[,readonly]
        rdzv_port: port of the c10d rendezvous store on replica 0 (several nodes)
        rdzv_conf: torchrun --rdzv-conf; long joins for slow image pulls
        max_restarts: worker-group restarts torchrun makes inside a node before failing
        max_retries: scheduler retries of the whole job
        name: job name
    """
    resource = specs.resource(cpu=cpu, gpu=gpu, memMB=memMB, h=h)
    gpus = max(int(resource.gpu), 0)
    if nproc_per_node == 0:
        nproc_per_node = gpus or 1
    if gpus and nproc_per_node != gpus:
        raise UserError(f"--nproc_per_node {nproc_per_node} with {gpus} GPUs per node: dmdr runs one "
                        "process per GPU; leave --nproc_per_node out")
    if nproc_per_node < 1:
        raise UserError(f"--nproc_per_node {nproc_per_node}: give at least 1, or 0 for one per GPU")
    low, high = parse_nnodes(nnodes)

    train_args = (["--preset", preset] if preset else []) + (["--config", config] if config else [])
    train_args += ["--resume-ckpt", "auto", *args]
    command = torchrun_command(train_args, low, high, nproc_per_node, rdzv_port, max_restarts, rdzv_conf)
    env = {**_check_env(env or {}), **_s3_env(s3_uri, s3_endpoint_url, s3_region, s3_path_style)}
    if high > 1:  # see the chart: a replaced node's agent would wait for a stale shared store
        env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    role = specs.Role(
        name=ROLE,
        image=image,
        entrypoint="bash",
        args=["-c", _bash(command)],
        env=env,
        num_replicas=high,
        min_replicas=low,
        resource=resource,
        port_map={"c10d": rdzv_port},
        max_retries=max_retries,
        mounts=specs.parse_mounts(mounts) if mounts else [],
    )
    _kubernetes_overlay(role, list(secrets or []))
    return specs.AppDef(name=name, roles=[role])
