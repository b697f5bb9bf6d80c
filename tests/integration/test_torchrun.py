"""Two processes under torchrun (gloo, CPU): global batch and identical generator replicas."""
import socket
import subprocess
import sys

import pytest

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
