"""Training-step overhead of S3 sync: the tiny preset with and without ``--s3-uri``, side by side.

Runs the real ``dmdr train`` (one process, CPU) alternately without and with object storage (a
moto S3 server on loopback, checkpoints and samples every few steps so uploads overlap training),
``--rounds`` times each, and compares the MEDIAN generator-step time taken from the loss log's
``time`` column (first steps dropped as warm-up). Goal: ratio <= 1.05.

    .venv/bin/python tests/bench/bench_sync_overhead.py --steps 40 --rounds 2
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers_s3 import MotoServer, aws_env  # noqa: E402
from helpers_train import DMDR, REPO, env, read_jsonl  # noqa: E402


def step_times(run_dir: Path, warmup: int) -> list[float]:
    t = [r["time"] for r in read_jsonl(run_dir / "loss_logs" / "loss_gen_log.jsonl")]
    return [b - a for a, b in zip(t, t[1:])][warmup:]


def run(tmp: Path, name: str, steps: int, extra: list[str], cache: Path, environ: dict) -> list[float]:
    cmd = DMDR + ["train", "--preset", "tiny", "--output-dir", str(tmp), "--exp-name", name, "--cache-dir", str(cache),
                  "--max-train-steps", str(steps), "--checkpoint-steps", "5", "--sample-steps", "5", *extra]
    subprocess.run(cmd, check=True, env=environ, cwd=REPO, capture_output=True, text=True)
    return step_times(tmp / name, warmup=3)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args(argv)
    os.environ.update({k: v for k, v in aws_env().items() if k.startswith("AWS_")})
    with tempfile.TemporaryDirectory() as d, MotoServer() as moto:
        tmp, cache = Path(d), Path(d) / "cache"
        bucket = moto.make_bucket()
        environ = env(cache, **aws_env())
        base, synced = [], []
        for r in range(args.rounds):
            base += run(tmp, f"plain{r}", args.steps, [], cache, environ)
            synced += run(tmp, f"s3{r}", args.steps,
                          ["--s3-uri", f"s3://{bucket}/bench", "--s3-endpoint-url", moto.endpoint], cache, environ)
        row = {"steps_per_run": args.steps, "rounds": args.rounds,
               "median_step_s_plain": statistics.median(base), "median_step_s_s3": statistics.median(synced)}
        row["ratio"] = row["median_step_s_s3"] / row["median_step_s_plain"]
        print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
