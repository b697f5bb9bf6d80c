"""The image e2e's Docker probe on a fresh machine: no Docker client installed at all must mean
"install one" (ci/image_e2e.sh does), never a crash before the e2e starts (issue 9, item 0)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
from test_image import docker_unavailable, engine_answers  # noqa: E402


def test_missing_client_is_no_engine(tmp_path):
    assert engine_answers(str(tmp_path / "usr" / "bin" / "docker")) is False
    assert engine_answers(None) is False


def test_client_that_is_not_executable_is_no_engine(tmp_path):
    fake = tmp_path / "docker"
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o644)
    assert engine_answers(str(fake)) is False


def test_client_whose_info_fails_is_no_engine(tmp_path):
    fake = tmp_path / "docker"
    fake.write_text("#!/bin/sh\necho 'Cannot connect to the Docker daemon' >&2\nexit 1\n")
    fake.chmod(0o755)
    assert engine_answers(str(fake)) is False


@pytest.mark.skipif(os.geteuid() != 0, reason="the e2e installs Docker only as root")
def test_fresh_machine_as_root_goes_on_to_install(tmp_path):
    """No client anywhere, root with apt-get: the e2e must run (and install docker.io)."""
    missing = str(tmp_path / "no-docker")
    assert docker_unavailable((missing, None)) is None


def test_running_engine_is_found(tmp_path):
    fake = tmp_path / "docker"
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    assert docker_unavailable((str(tmp_path / "missing"), str(fake))) is None
