"""Upload/download throughput of a checkpoint-like folder: dmdr's Syncer/pull vs `aws s3 cp --recursive`.

Both run with their default tuning, and the same request checksums (--checksum), against a moto
S3 server started fresh for each measurement (or --endpoint), for --rounds rounds with the order
alternating; the summary has the median of each, the ratio of the medians and the median of the
per-round ratios (each round's two tools ran back to back, so load drift cancels best there), and
the CPU seconds per GiB of client and server. Usage::

    .venv/bin/python tests/bench/bench_transfer.py --size-gb 2 --aws /tmp/awscli-venv/bin/aws

awscli pins its own botocore, so install it in its own venv:
``python -m venv /tmp/awscli-venv && /tmp/awscli-venv/bin/pip install awscli``.
Prints one line per measurement and a JSON summary with the ratios (ours / aws, > 1: ours faster).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psutil  # noqa: E402

from helpers_s3 import MotoServer, aws_env, make_checkpoint  # noqa: E402

from dmdr.storage import StorageConfig, Syncer, download_checkpoint  # noqa: E402
from dmdr.storage.client import MiB  # noqa: E402


def checkpoint_layout(total: int) -> dict[str, int]:
    """File sizes shaped like a DMDR checkpoint: big weights and optimizer state, small extras."""
    small = {"accelerator_1/step-{s}/random_states_0.pkl": 16_000,
             "accelerator_1/step-{s}/scheduler.bin": 1_000,
             "lora_gen/step-{s}/adapter_config.json": 800, "lora_gui/step-{s}/adapter_config.json": 800,
             "lora_gui/step-{s}/adapter_model.safetensors": 3 * MiB}
    rest = total - sum(small.values())
    return {"accelerator_1/step-{s}/model.safetensors": rest * 45 // 100,
            "accelerator_2/step-{s}/optimizer.bin": rest * 35 // 100,
            "accelerator_2/step-{s}/model.safetensors": rest * 12 // 100,
            "torch_units/step-{s}.pt": rest - rest * 92 // 100, **small}


def _cpu_seconds(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def timed(label: str, size: int, fn, server_pid: int | None) -> tuple[float, float, float]:
    """Run `fn`; MiB/s, and CPU seconds per GiB of the client (this process plus its children:
    the aws command) and of the server process. On a CPU-bound machine the CPU cost is the stabler
    figure: wall time swings with whatever else runs, CPU seconds per byte much less."""
    server = psutil.Process(server_pid) if server_pid else None
    cpu0 = _cpu_seconds(resource.RUSAGE_SELF) + _cpu_seconds(resource.RUSAGE_CHILDREN)
    srv0 = sum(server.cpu_times()[:2]) if server else 0.0
    started = time.perf_counter()
    fn()
    seconds = time.perf_counter() - started
    client_cpu = _cpu_seconds(resource.RUSAGE_SELF) + _cpu_seconds(resource.RUSAGE_CHILDREN) - cpu0
    server_cpu = sum(server.cpu_times()[:2]) - srv0 if server else float("nan")
    gib = size / (1024 * MiB)
    rate = size / MiB / seconds
    print(f"{label:<16} {size / MiB:8.0f} MiB in {seconds:6.2f}s = {rate:7.1f} MiB/s; CPU s/GiB: "
          f"client {client_cpu / gib:5.2f}, server {server_cpu / gib:5.2f}", flush=True)
    return rate, client_cpu / gib, server_cpu / gib


def run_tool(tool: str, exp: Path, size: int, client, endpoint: str, aws: str,
             work: Path, server_pid: int | None) -> dict[str, tuple[float, float, float]]:
    """Upload then download the checkpoint with one tool into a fresh bucket; `timed` of each."""
    bucket = f"bench-{tool}-{time.time_ns()}"
    client.create_bucket(Bucket=bucket)
    uri, pulled, rates = f"s3://{bucket}/runs/exp", work / f"pulled-{tool}", {}
    if tool == "dmdr":
        cfg = StorageConfig(s3_uri=uri, endpoint_url=endpoint)
        syncer = Syncer(exp, uri, cfg, sync_interval=0)

        def upload() -> None:
            syncer.submit_checkpoint(1)
            assert syncer.wait_checkpoint() and syncer.uploaded_checkpoints == [1]

        rates["upload"] = timed("dmdr upload", size, upload, server_pid)
        syncer.close()
        rates["download"] = timed("dmdr download", size, lambda: download_checkpoint(
            uri, 1, pulled, cfg=cfg, progress=False), server_pid)
    else:
        cmd = [aws, "s3", "cp", "--recursive", "--only-show-errors", "--endpoint-url", endpoint]
        rates["upload"] = timed("aws upload", size, lambda: subprocess.run(
            [*cmd, str(exp / "checkpoints"), f"{uri}/checkpoints"], check=True), server_pid)
        rates["download"] = timed("aws download", size, lambda: subprocess.run(
            [*cmd, f"{uri}/checkpoints", str(pulled / "checkpoints")], check=True), server_pid)
    shutil.rmtree(pulled)
    _empty_bucket(client, bucket)  # free the server's memory
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gb", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=2, help="rounds; the tool order alternates")
    parser.add_argument("--aws", default=shutil.which("aws") or "/tmp/awscli-venv/bin/aws")
    parser.add_argument("--endpoint", help="use this S3 endpoint instead of a fresh moto server")
    parser.add_argument("--checksum", choices=("when_required", "when_supported"), default="when_required",
                        help="AWS_REQUEST_CHECKSUM_CALCULATION for BOTH tools (default: dmdr's own default "
                             "for a custom endpoint; awscli alone would send CRC32 checksums)")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the cleanup below

    # Both tools read the same variable, so they send the same checksums: without it awscli sends
    # CRC32 per part while dmdr sends none, and moto then computes a full-object checksum itself
    # (copying every object twice more), which made the tools' server costs differ.
    os.environ.update({k: v for k, v in aws_env().items() if k.startswith("AWS_")},
                      AWS_REQUEST_CHECKSUM_CALCULATION=args.checksum)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="dmdr-bench-"))
    try:
        exp = work / "exp"
        size = make_checkpoint(exp, 1, checkpoint_layout(int(args.size_gb * 1024 * MiB))).size
        rates: dict[str, list[tuple[float, float, float]]] = {}
        for rnd in range(args.rounds):
            for tool in ("dmdr", "aws") if rnd % 2 == 0 else ("aws", "dmdr"):
                # A fresh moto per measurement: its speed drifts as it serves more data.
                with contextlib.ExitStack() as stack:
                    server = None if args.endpoint else stack.enter_context(MotoServer())
                    endpoint = args.endpoint or server.endpoint
                    client = server.client() if server else _client(endpoint)
                    pid = server.proc.pid if server else None
                    for op, got in run_tool(tool, exp, size, client, endpoint, args.aws, work, pid).items():
                        rates.setdefault(f"{tool}_{op}", []).append(got)
        med = {k: statistics.median(r for r, _, _ in v) for k, v in rates.items()}
        cpu = {k: (statistics.median(c for _, c, _ in v), statistics.median(s for _, _, s in v))
               for k, v in rates.items()}
        summary = {"size_mib": round(size / MiB), "rounds": args.rounds, "checksum": args.checksum,
                   **{f"{k}_mib_s": round(v, 1) for k, v in med.items()},
                   **{f"{k}_cpu_s_per_gib": {"client": round(c, 2), "server": round(s, 2)}
                      for k, (c, s) in cpu.items()},
                   "upload_ratio": round(med["dmdr_upload"] / med["aws_upload"], 2),
                   "download_ratio": round(med["dmdr_download"] / med["aws_download"], 2),
                   **{f"{op}_ratio_per_round": round(statistics.median(
                       d[0] / a[0] for d, a in zip(rates[f"dmdr_{op}"], rates[f"aws_{op}"])), 2)
                      for op in ("upload", "download")}}
        print(json.dumps(summary))
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


def _client(endpoint: str):
    import boto3
    return boto3.client("s3", endpoint_url=endpoint)


def _empty_bucket(client, bucket: str) -> None:
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for obj in page.get("Contents", []):
            client.delete_object(Bucket=bucket, Key=obj["Key"])
    client.delete_bucket(Bucket=bucket)


if __name__ == "__main__":
    main()
