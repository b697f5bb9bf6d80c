"""Run the real `dmdr` command for the trainer's integration tests."""
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DMDR = [sys.executable, "-m", "dmdr"]


def env(cache_dir: Path, **extra) -> dict:
    e = dict(os.environ)
    e.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
              "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"})
    e.update({k: str(v) for k, v in extra.items()})
    return e


def tiny_args(out: Path, exp: str, cache: Path, *extra: str) -> list[str]:
    return ["train", "--preset", "tiny", "--output-dir", str(out), "--exp-name", exp,
            "--cache-dir", str(cache), *extra]


def run_dmdr(args: list[str], cache: Path, timeout: int = 600, check: bool = True, **extra_env):
    proc = subprocess.run(DMDR + args, capture_output=True, text=True, timeout=timeout,
                          env=env(cache, **extra_env), cwd=REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"dmdr {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def readme_commands(heading: str, every_block: bool = False) -> list[list[str]]:
    """The `dmdr ...` lines of the first bash block after `heading` in README.md (`every_block`: of
    every bash block up to the next heading of that level), split as a shell would."""
    section = (REPO / "README.md").read_text(encoding="utf-8").split(heading, 1)[1]
    if every_block:
        section = section.split("\n" + heading.split(" ", 1)[0] + " ", 1)[0]
    blocks = [b.split("```", 1)[0] for b in section.split("```bash\n")[1:]]
    return [shlex.split(line, comments=True) for block in (blocks if every_block else blocks[:1])
            for line in block.splitlines() if line.startswith("dmdr ")]


def train_tiny_into_store(moto, base: Path, *flags: str) -> tuple[str, Path]:
    """A tiny run `exp` of 2 steps trained in `base/pod` with --s3-uri s3://<a new bucket>/prefix on
    `moto`, with `flags` (checkpoint/sample steps); returns (the bucket, the cache folder)."""
    from helpers_s3 import aws_env

    bucket, cache = moto.make_bucket(), base / "cache"
    run_dmdr(tiny_args(base / "pod", "exp", cache, "--max-train-steps", "2", *flags,
                       "--s3-uri", f"s3://{bucket}/prefix", "--s3-endpoint-url", moto.endpoint), cache, **aws_env())
    return bucket, cache
