"""Install the trainer's dependencies into a PyTorch base image without replacing its torch.

    python install_deps.py [--extras tensorboard,bnb] DIR

DIR holds pyproject.toml and constraints.txt (the CI-tested pins). Constraints given to pip:
exact pins of the base's torch family (what `pip freeze` says is installed), plus the CI pins of
every package the base does not already have. So pip adds what is missing at tested versions,
upgrades a base package only when a dependency demands it, and fails instead of swapping torch.
A CA bundle passed as the BuildKit secret ``ca_bundle`` is used for the index when present.
Standard library only: it runs before anything is installed.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10 bases
    from pip._vendor import tomli as tomllib  # type: ignore[no-redef]

TORCH_FAMILY = ("torch", "torchvision", "torchaudio", "triton")
CA_SECRET = Path("/run/secrets/ca_bundle")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def installed() -> dict[str, str]:
    """{canonical name: version} of the distributions in this interpreter."""
    return {canonical(d.metadata["Name"]): d.version for d in metadata.distributions() if d.metadata["Name"]}


def requirements(pyproject: Path, extras: list[str]) -> list[str]:
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))
    reqs = list(project["project"]["dependencies"])
    optional = project["project"].get("optional-dependencies", {})
    for extra in extras:
        if extra not in optional:
            sys.exit(f"install_deps: unknown extra {extra!r}; choose from {', '.join(sorted(optional))}")
        reqs += optional[extra]
    return reqs + list(project["build-system"]["requires"])  # the package is built without isolation


def constraints(pins_file: Path, have: dict[str, str]) -> list[str]:
    lines = [f"{name}=={have[name]}" for name in TORCH_FAMILY if name in have]
    for line in pins_file.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        name = canonical(re.split(r"[=<>!~\[; ]", line, maxsplit=1)[0]) if line else ""
        if name and name not in have and not name.startswith(("nvidia-", "cuda-")):
            lines.append(line)
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--extras", default="", help="comma-separated optional-dependency groups")
    parser.add_argument("dir", type=Path, help="folder with pyproject.toml and constraints.txt")
    args = parser.parse_args()

    have = installed()
    if "torch" not in have:
        sys.exit("install_deps: the base image has no torch; use a PyTorch image as BASE_IMAGE "
                 "(e.g. pytorch/pytorch:<version>-cuda<x>-cudnn9-runtime).")
    extras = [e for e in re.split(r"[,\s]+", args.extras) if e]
    cons = args.dir / "build-constraints.txt"
    cons.write_text("\n".join(constraints(args.dir / "constraints.txt", have)) + "\n", encoding="utf-8")
    env = dict(os.environ)
    if CA_SECRET.is_file() and CA_SECRET.stat().st_size:
        env.update(PIP_CERT=str(CA_SECRET), SSL_CERT_FILE=str(CA_SECRET), REQUESTS_CA_BUNDLE=str(CA_SECRET))
    print(f"install_deps: keeping torch {have['torch']} of the base image", flush=True)
    cmd = [sys.executable, "-m", "pip", "install", "--no-cache-dir", "--progress-bar", "off",
           "-c", str(cons), *requirements(args.dir / "pyproject.toml", extras)]
    subprocess.run(cmd, env=env, check=True)
    after = installed()
    changed = [n for n in TORCH_FAMILY if n in have and after.get(n) != have[n]]
    if changed:
        sys.exit(f"install_deps: pip replaced {', '.join(changed)} of the base image; pick a BASE_IMAGE "
                 "whose torch satisfies pyproject.toml.")
    subprocess.run([sys.executable, "-m", "pip", "check"], env=env, check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
