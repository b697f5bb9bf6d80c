"""`dmdr demo`: the two stages of the DMDR recipe on the tiny model, on a CPU, in about a minute.

Stage 1 is the cold start (DMD only); stage 2 starts from its last checkpoint (``--init-ckpt``) and
adds ReFL with tiny random CLIP and HPS reward models, written here in the real open_clip file
formats and loaded by the trainer's own code. Each stage is a real ``dmdr train`` process; the demo
ends by printing the commands that use the result.
"""
from __future__ import annotations

import argparse
import math
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from dmdr.errors import UserError

STAGES = ("cold-start", "refl")
#: The demo stays on this machine: a store configured in the environment is not used.
LOCAL_ONLY = ("DMDR_S3_URI", "DMDR_S3_ENDPOINT_URL", "DMDR_S3_PATH_STYLE")
N_PROMPTS = 4  # prompts of the printed `dmdr sample` / `dmdr score` commands


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``demo`` subcommand; sets ``func=run``."""
    p = subparsers.add_parser(
        "demo", help="both training stages (cold start, then DMD + ReFL) on the tiny model, on CPU",
        description="Train the tiny preset in the two stages of the recipe: a DMD-only cold start, then "
                    "DMD + ReFL with tiny CLIP and HPS reward models from its last checkpoint. Writes "
                    "<output-dir>/<exp-name>/{cold-start,refl,rewards} and prints the next commands.")
    p.add_argument("--output-dir", default="outputs", help="parent folder (default: %(default)s)")
    p.add_argument("--exp-name", default="demo", help="folder of the demo in it (default: %(default)s)")
    p.add_argument("--steps", type=int, default=10, help="generator steps of each stage (default: %(default)s)")
    p.add_argument("--cache-dir", default=None, help="cache of the built tiny model (default: dmdr train's)")
    p.add_argument("--overwrite", action="store_true", help="start over where a demo already ran")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    if args.steps < 1:
        raise UserError(f"--steps {args.steps}: must be at least 1")
    start = time.monotonic()
    root = Path(args.output_dir) / args.exp_name
    runs = {name: root / name for name in STAGES}
    for path in runs.values():
        if not args.overwrite and path.is_dir() and any(path.iterdir()):
            raise UserError(f"{path} already holds a demo run: add --overwrite to start over, "
                            "or choose another --output-dir / --exp-name")
    common = ["--preset", "tiny", "--output-dir", str(root), "--max-train-steps", str(args.steps)]
    every = str(math.ceil(args.steps / 2))  # a sample grid and a checkpoint halfway and at the end
    common += ["--sample-steps", every, "--checkpoint-steps", every]
    if args.cache_dir:
        common += ["--cache-dir", args.cache_dir]
    if args.overwrite:
        common.append("--overwrite")

    print(f"== stage 1/2: cold start, DMD only: {runs['cold-start']}", flush=True)
    cold = _start(common + ["--exp-name", "cold-start", "--cold-start-iter", str(args.steps)])
    try:  # while stage 1 starts in its own process: the two processes' imports overlap
        rewards, prompts = _write_inputs(root)
    except BaseException:
        _stop(cold)
        raise
    if status := _wait(cold):
        return _failed(1, runs["cold-start"], status)

    print(f"== stage 2/2: DMD + ReFL (tiny CLIP and HPS rewards) from stage 1's last checkpoint: {runs['refl']}",
          flush=True)
    refl = _start(common + [
        "--exp-name", "refl", "--init-ckpt", str(runs["cold-start"]), "--cold-start-iter", "0",
        "--clip-reward-model", str(rewards["clip"]), "--clip-reward-arch", str(rewards["config"]),
        "--hpsv2-reward-model", str(rewards["hps"]), "--hps-reward-arch", str(rewards["config"]),
        "--reward-clip-weight", "0.3", "--reward-hps-weight", "0.3", "--magic-prompt", "Realistic photo"])
    if status := _wait(refl):
        return _failed(2, runs["refl"], status)

    print(f"== demo done in {time.monotonic() - start:.0f} s: stage 1 in {runs['cold-start']}, "
          f"stage 2 in {runs['refl']} (loss logs: {runs['refl'] / 'loss_logs'})")
    print("next:")
    for line in next_commands(root, runs["refl"], prompts, rewards):
        print("  " + line)
    return 0


def _write_inputs(root: Path) -> tuple[dict[str, Path], Path]:
    """The tiny reward models (real open_clip formats) and the prompt file of the next commands."""
    from dmdr.data import SAMPLE_PROMPTS
    from dmdr.models.tiny_clip import write_tiny_reward_checkpoints

    rewards = write_tiny_reward_checkpoints(root / "rewards", seed=0)
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(SAMPLE_PROMPTS[:N_PROMPTS]) + "\n", encoding="utf-8")
    return rewards, prompts


def _failed(stage: int, run_dir: Path, status: int) -> int:
    print(f"dmdr demo: stage {stage} ({run_dir.name}) exited with status {status}; its output is above and in "
          f"{run_dir / 'log.txt'}", file=sys.stderr, flush=True)
    return status


def next_commands(root: Path, run_dir: Path, prompts: Path, rewards: dict[str, Path]) -> list[str]:
    """The commands that use the demo's result, with its paths (quoted for a shell)."""
    q = _quote
    samples = root / "samples"
    return [
        f"dmdr sample --run {q(run_dir)} --prompts {q(prompts)} --out {q(samples)}",
        f"dmdr score --images {q(samples)} --prompts {q(prompts)} --hpsv2-reward-model {q(rewards['hps'])} "
        f"--hps-reward-arch {q(rewards['config'])} --out {q(root / 'scores.json')}",
        f"dmdr export --run {q(run_dir)} --out {q(root / 'unet')}",
        f"dmdr plot --run {q(run_dir)}",
    ]


def _quote(path: Path) -> str:
    return shlex.quote(str(path))


def _start(argv: list[str]) -> subprocess.Popen:
    """`dmdr train ARGV` in a child process with the demo's environment."""
    env = {k: v for k, v in os.environ.items() if k not in LOCAL_ONLY}
    env.setdefault("OMP_NUM_THREADS", "1")  # the tiny model's small matmuls: several times faster on one thread
    env.update({"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    return subprocess.Popen([sys.executable, "-m", "dmdr", "train", *argv], env=env)


def _wait(proc: subprocess.Popen) -> int:
    """The stage's exit status; on Ctrl-C it stops cleanly (it saves a checkpoint) before we exit."""
    try:
        return proc.wait()
    except KeyboardInterrupt:
        _stop(proc)
        raise


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        proc.wait()
