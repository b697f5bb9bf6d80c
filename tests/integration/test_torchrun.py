"""Two processes under torchrun (gloo, CPU): global batch and identical generator replicas."""
import json
import socket
import subprocess
import sys

import pytest

from dmdr import data
from helpers_train import REPO, env, read_jsonl, tiny_args

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("rdzv", ["static", "elastic"])
def test_torchrun_two_processes(tmp_path, rdzv):
    cache = tmp_path / "cache"
    port = free_port()
    if rdzv == "static":
        launch = ["--nnodes", "1", "--node-rank", "0", "--nproc-per-node", "2",
                  "--master-addr", "127.0.0.1", "--master-port", str(port)]
    else:
        launch = ["--nnodes", "1:2", "--nproc-per-node", "2", "--rdzv-backend", "c10d",
                  "--rdzv-endpoint", f"127.0.0.1:{port}", "--max-restarts", "0"]
    cmd = [sys.executable, "-m", "torch.distributed.run", *launch, "-m", "dmdr",
           *tiny_args(tmp_path, "ddp", cache, "--max-train-steps", "3", "--checkpoint-steps", "3", "--sample-steps", "3")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env(cache), cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    log = (tmp_path / "ddp" / "log.txt").read_text()
    assert "2 processes x batch 2 x accumulation 1 = 4 prompts per step" in log
    assert "generator replicas identical on 2 processes" in log
    assert [r["step"] for r in read_jsonl(tmp_path / "ddp" / "loss_logs" / "loss_gen_log.jsonl")] == [1, 2, 3]
    assert (tmp_path / "ddp" / "checkpoints" / "step-3.complete.json").is_file()
    # each rank's RNG state is saved, so a resume restores per-rank noise
    assert (tmp_path / "ddp" / "checkpoints" / "accelerator_1" / "step-3" / "random_states_1.pkl").is_file()
    # the sample grid holds both ranks' images (2 x 2) and names their prompts in rank order
    grid = json.loads((tmp_path / "ddp" / "samples" / "step-000003_seed-30.json").read_text())
    assert (grid["rows"], grid["cols"]) == (2, 2)
    assert [t["prompt"] for t in grid["tiles"]] == list(data.SAMPLE_PROMPTS[:4])


def _torchrun(tmp_path, *args: str) -> list[str]:
    port = free_port()
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--node-rank", "0",
            "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port", str(port), *args]


def test_lr_warmup_counts_optimizer_steps_on_two_processes(tmp_path):
    """--lr-warmup-steps 3: the logged rate (the rate of that update) is lr*k/3 at the k-th update
    and the peak at the 3rd, on 2 processes as on one (not after 3/2 updates)."""
    cache = tmp_path / "cache"
    lr = 1e-4
    cmd = _torchrun(tmp_path, "-m", "dmdr", *tiny_args(
        tmp_path, "warm", cache, "--max-train-steps", "4", "--ratio-update", "1", "--lr-warmup-steps", "3",
        "--learning-rate-gen", str(lr), "--learning-rate-gui", str(lr)))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env(cache), cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    logs = tmp_path / "warm" / "loss_logs"
    want = [lr / 3, 2 * lr / 3, lr, lr]
    assert [r["lr_gen"] for r in read_jsonl(logs / "loss_gen_log.jsonl")] == pytest.approx(want, rel=1e-9)
    assert [r["lr_gui"] for r in read_jsonl(logs / "loss_gui_log.jsonl")][:4] == pytest.approx(want, rel=1e-9)


REDUCE_SCRIPT = """
import json, sys
import torch
from accelerate import Accelerator
from dmdr.train import Trainer

acc = Accelerator(cpu=True)
t = Trainer.__new__(Trainer)  # only the log reduction of the real trainer
t.acc, t.device = acc, acc.device
r = acc.process_index
# a generator-step log as generator_step builds it: loss tensors, reward scores from RewardSet.loss
row = t._reduce({"loss_dmd": torch.tensor(1.0 + r), "clip": 0.2 + 0.4 * r, "hps": 0.1 * r, "real_lora_scale": 0.3})
if acc.is_main_process:
    print("ROW " + json.dumps(row))
"""


def test_logged_rewards_are_averaged_over_processes(tmp_path):
    script = tmp_path / "reduce.py"
    script.write_text(REDUCE_SCRIPT)
    proc = subprocess.run(_torchrun(tmp_path, str(script)), capture_output=True, text=True, timeout=300,
                          env=env(tmp_path), cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    row = json.loads(next(line[4:] for line in proc.stdout.splitlines() if line.startswith("ROW ")))
    assert row == pytest.approx({"loss_dmd": 1.5, "clip": 0.4, "hps": 0.05, "real_lora_scale": 0.3}, rel=1e-12)
