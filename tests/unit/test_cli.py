"""The `dmdr` command line: answers at once (no heavy imports to build the parser), --version,
grouped `train --help` with choices and defaults, one-line errors for missing models/weights."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dmdr import config

HEAVY = ("torch", "numpy", "boto3", "botocore", "s3transfer", "diffusers", "transformers", "open_clip",
         "huggingface_hub", "accelerate", "PIL", "matplotlib")


def run(*args: str, env: dict | None = None, cwd: Path | None = None, timeout: float = 600):
    return subprocess.run([sys.executable, "-m", "dmdr", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, cwd=cwd, timeout=timeout)


def test_building_the_parser_imports_no_heavy_module():
    code = ("import json, sys; from dmdr.cli import build_parser; p = build_parser(); p.format_help(); "
            "[a.choices[c].format_help() for a in p._subparsers._group_actions for c in a.choices]; "
            "print(json.dumps(sorted(m for m in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = {m.split(".")[0] for m in json.loads(out.stdout)}
    assert not loaded & set(HEAVY), sorted(loaded & set(HEAVY))


@pytest.mark.parametrize("args", [("--help",), ("train", "--help"), ("weights", "list", "--help")])
def test_help_answers_within_a_few_seconds(args):
    t0 = time.perf_counter()
    out = run(*args)
    elapsed = time.perf_counter() - t0
    assert out.returncode == 0, out.stderr
    assert elapsed < 3.0, f"dmdr {' '.join(args)} took {elapsed:.1f}s"  # torch alone takes longer


def test_version_comes_from_the_package_metadata():
    from importlib.metadata import version

    out = run("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"dmdr {version('dmdr')}"


def test_every_train_option_sits_in_a_section_of_the_config():
    where = config.sections()
    assert set(where) == set(config.FIELDS)  # a new field below a section marker lands in that section
    assert where["output_dir"] == "run and outputs" and where["pretrained_model"] == "models"
    assert where["learning_rate_gen"] == "optimisation" and where["max_train_steps"] == "the DMDR schedule"
    assert where["reward_clip_weight"] == "rewards" and where["checkpoint_steps"] == "checkpoints, samples, logs"
    assert where["s3_uri"].startswith("object storage")


def test_train_help_groups_options_and_shows_choices_and_defaults():
    text = run("train", "--help", env={"COLUMNS": "200"}).stdout
    titles = re.findall(r"^(\S[^\n]*):$", text, re.M)
    assert titles[:1] == ["options"]
    assert titles[1:] == list(dict.fromkeys(config.sections().values()))
    section = text.split("\noptimisation:\n")[1].split("\n\n")[0]
    assert re.search(r"--mixed-precision \{no,fp16,bf16\}\s+Mixed precision\. \[choices: no, fp16, bf16; default: no\]", section)
    assert "--learning-rate-gen FLOAT" in section and "[default: 1e-07]" in section
    assert "--s3-uri" not in section
    assert re.search(r"--s3-uri STR\s+Remote home of runs.*\[default: none; env DMDR_S3_URI\]", text)


def test_train_without_a_model_offline_is_one_line_naming_the_fix(tmp_path):
    """The default teacher is a hub id: with the hub unreachable, one line (exit 2), no traceback."""
    env = {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "", "HF_HOME": str(tmp_path / "hf"),
           "OMP_NUM_THREADS": "1"}
    out = run("train", "--output-dir", str(tmp_path), "--cache-dir", str(tmp_path / "cache"),
              "--max-train-steps", "1", env=env)
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    errors = [line for line in out.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, out.stderr
    assert "stabilityai/stable-diffusion-xl-base-1.0" in errors[0] and "--preset tiny" in errors[0]
    assert "local diffusers SDXL folder" in errors[0]


def test_weights_list_works_without_a_manifest_from_anywhere(tmp_path):
    out = run("weights", "list", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "Apple_CLIP-H-14-224.bin" in out.stdout and "HPS_v2.1_compressed.pt" in out.stdout
    assert re.search(r"^\s+GROUP\s+NAME\s+SIZE\s+SHA256\s+SOURCE", out.stdout, re.M)
    assert "* = a default group (rewards)" in out.stdout  # the legend explains the marks


def test_weights_list_shows_pinned_size_and_sha256(tmp_path):
    sha = "ab" * 32
    manifest = tmp_path / "m.yaml"
    manifest.write_text(f"default_groups: [g]\nfiles:\n  - name: f.bin\n    group: g\n    sources: [/nope]\n"
                        f"    sha256: {sha}\n    size: 3145728\n")
    out = run("weights", "list", "--manifest", str(manifest))
    assert out.returncode == 0, out.stderr
    row = next(line for line in out.stdout.splitlines() if "f.bin" in line)
    assert row.startswith("* g ") and "3.0 MiB" in row and sha in row


def test_weights_fetch_offline_says_the_hub_cannot_be_reached(tmp_path):
    env = {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    out = run("weights", "fetch", "--dest", str(tmp_path / "w"), "--groups", "taesdxl", "--no-progress", env=env)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr and "does not exist" not in out.stderr
    assert "HF_HUB_OFFLINE is set" in out.stderr and "mirror" in out.stderr
