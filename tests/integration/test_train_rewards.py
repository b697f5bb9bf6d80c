"""Reward fine-tuning through the real CLI: tiny reward checkpoints, on after --cold-start-iter."""
import pytest

from dmdr.models.tiny_clip import write_tiny_reward_checkpoints
from helpers_train import read_jsonl, run_dmdr, tiny_args

pytestmark = pytest.mark.slow


def test_rewards_switch_on_after_cold_start(tmp_path):
    cache = tmp_path / "cache"
    files = write_tiny_reward_checkpoints(tmp_path / "rewards", seed=0)
    run_dmdr(tiny_args(
        tmp_path, "r", cache, "--max-train-steps", "4", "--cold-start-iter", "2", "--sample-steps", "2",
        "--checkpoint-steps", "4",
        "--clip-reward-model", str(files["clip"]), "--clip-reward-arch", str(files["config"]),
        "--hpsv2-reward-model", str(files["hps"]), "--hps-reward-arch", str(files["config"]),
        "--reward-clip-weight", "0.3", "--reward-hps-weight", "0.3", "--magic-prompt", "Realistic photo",
    ), cache)
    rows = read_jsonl(tmp_path / "r" / "loss_logs" / "loss_gen_log.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for r in rows[:2]:  # computed at generator steps 0 and 1: before the reward phase
        assert r["clip"] == 0 and r["hps"] == 0
    for r in rows[2:]:
        assert r["clip"] != 0 and r["hps"] != 0
        assert r["loss_gen"] != r["loss_dmd"]  # the hinge losses are in the generator loss
    # sample prompts are scored at every sample step, reward curves in the same log
    assert "sample_clip" in rows[1] and "sample_hps" in rows[3]


def test_missing_reward_file_fails_before_training(tmp_path):
    cache = tmp_path / "cache"
    proc = run_dmdr(tiny_args(tmp_path, "m", cache, "--hpsv2-reward-model", str(tmp_path / "nope.pt"),
                              "--reward-hps-weight", "0.3"), cache, check=False)
    assert proc.returncode == 2
    assert "nope.pt" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "m" / "checkpoints").exists()
