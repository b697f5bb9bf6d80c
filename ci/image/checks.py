"""Python steps of ci/image_e2e.sh (run with the project's venv).

    checks.py free-port
    checks.py tiny-weights DIR URL MANIFEST       tiny reward files in DIR, a manifest naming URL/...
    checks.py make-bucket ENDPOINT BUCKET
    checks.py s3-latest ENDPOINT BUCKET PREFIX    a checkpoints/latest.json below the prefix
    checks.py rewards-used RUN_DIR                the last generator step scored both rewards
    checks.py registry-digest REGISTRY REPO TAG DIGEST
    checks.py cached BUILD_LOG STAGE...           the RUN/COPY steps of these stages were CACHED
"""
from __future__ import annotations

import json
import re
import socket
import sys
import urllib.request
from pathlib import Path


def free_port() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        print(s.getsockname()[1])


def tiny_weights(directory: str, url: str, manifest: str) -> None:
    """Tiny CLIP/HPS checkpoints under the real names, and a manifest with their sha256."""
    from dmdr.models.tiny_clip import write_tiny_reward_checkpoints
    from dmdr.storage.hashio import sha256_file

    files = write_tiny_reward_checkpoints(directory, seed=0)
    names = {"clip": "Apple_CLIP-H-14-224.bin", "hps": "HPS_v2.1_compressed.pt", "config": "tiny-open-clip.json"}
    lines = ["# ci/image_e2e.sh: tiny reward models served on loopback", "default_groups: [rewards]", "files:"]
    for key, name in names.items():
        lines += [f"  - name: {name}", "    group: rewards", f"    sources: [{url}/{files[key].name}]",
                  f"    sha256: {sha256_file(files[key])}", f"    size: {files[key].stat().st_size}"]
    Path(manifest).write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(Path(manifest).read_text(encoding="utf-8"), end="")


def _s3(endpoint: str):
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                        aws_access_key_id="testing", aws_secret_access_key="testing")


def make_bucket(endpoint: str, bucket: str) -> None:
    _s3(endpoint).create_bucket(Bucket=bucket)


def s3_latest(endpoint: str, bucket: str, prefix: str) -> None:
    client = _s3(endpoint)
    keys = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
            for o in page.get("Contents", [])]
    latest = [k for k in keys if k.endswith("checkpoints/latest.json")]
    print(f"s3://{bucket}/{prefix}: {len(keys)} objects")
    if not latest:
        sys.exit(f"no checkpoints/latest.json under s3://{bucket}/{prefix}: {keys[:20]}")
    body = client.get_object(Bucket=bucket, Key=latest[0])["Body"].read().decode()
    print(f"s3://{bucket}/{latest[0]}: {body.strip()}")


def rewards_used(run_dir: str) -> None:
    rows = [json.loads(x) for x in (Path(run_dir) / "loss_logs/loss_gen_log.jsonl").read_text().splitlines()]
    last = rows[-1]
    print(f"last generator step {last.get('step')}: clip {last.get('clip')}, hps {last.get('hps')}")
    if not last.get("clip") or not last.get("hps"):
        sys.exit("the bundled reward models were not used in training")


def registry_digest(registry: str, repo: str, tag: str, digest: str) -> None:
    """The registry serves REPO:TAG under the pushed digest, with every blob it references."""
    accept = "application/vnd.docker.distribution.manifest.v2+json, application/vnd.oci.image.manifest.v1+json"
    request = urllib.request.Request(f"http://{registry}/v2/{repo}/manifests/{tag}", headers={"Accept": accept})
    with urllib.request.urlopen(request, timeout=10) as response:
        served = response.headers["Docker-Content-Digest"]
        manifest = json.loads(response.read())
    if served != digest:
        sys.exit(f"registry digest {served} != pushed digest {digest}")
    blobs = [manifest["config"], *manifest["layers"]]
    for blob in blobs:
        head = urllib.request.Request(f"http://{registry}/v2/{repo}/blobs/{blob['digest']}", method="HEAD")
        with urllib.request.urlopen(head, timeout=10) as response:
            if int(response.headers["Content-Length"]) != blob["size"]:
                sys.exit(f"blob {blob['digest']} has the wrong size in the registry")
    total = sum(b["size"] for b in blobs)
    print(f"registry {registry}/{repo}:{tag} -> {served}: {len(blobs)} blobs, {total / 2**30:.2f} GiB compressed")


def cached(build_log: str, *stages: str) -> None:
    """Each RUN/COPY step of `stages` in a `--progress plain` BuildKit log is reported CACHED."""
    text = Path(build_log).read_text(encoding="utf-8", errors="replace")
    pattern = r"^#(\d+) \[(\S+) +\d+/\d+\] ((?:RUN|COPY) .*)$"
    steps = {n: (stage, what) for n, stage, what in re.findall(pattern, text, re.M)}
    done = set(re.findall(r"^#(\d+) CACHED$", text, re.M))
    bad = []
    for n, (stage, what) in sorted(steps.items(), key=lambda kv: int(kv[0])):
        if stage in stages:
            state = "CACHED" if n in done else "rebuilt"
            print(f"  [{stage}] {what[:90]}: {state}")
            if n not in done:
                bad.append(what)
    if not any(stage in stages for stage, _ in steps.values()):
        sys.exit(f"no steps of {stages} found in {build_log}")
    if bad:
        sys.exit(f"not cached: {bad}")


COMMANDS = {"free-port": free_port, "tiny-weights": tiny_weights, "make-bucket": make_bucket,
            "s3-latest": s3_latest, "rewards-used": rewards_used, "registry-digest": registry_digest, "cached": cached}

if __name__ == "__main__":
    COMMANDS[sys.argv[1]](*sys.argv[2:])
