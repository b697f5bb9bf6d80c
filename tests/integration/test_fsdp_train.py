"""`dmdr train --distributed fsdp --mixed-precision bf16` on two processes (torchrun, gloo, CPU):
sharded checkpoints, an exact resume from them, and `dmdr export` consolidating the generator."""
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from helpers_train import REPO, env, read_jsonl, run_dmdr, tiny_args
from test_torchrun import free_port

pytestmark = pytest.mark.slow


def _train(out, exp, cache, *extra):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", "dmdr",
           *tiny_args(out, exp, cache, "--distributed", "fsdp", "--mixed-precision", "bf16", "--max-train-steps", "3",
                      "--checkpoint-steps", "2", "--sample-steps", "3", *extra)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env(cache), cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def _consolidated(tmp_path, step_dir, name):
    """The full state of DCP shards, by torch's own converter (independent of dmdr's reader)."""
    dcp_to_torch_save(step_dir / "sharded", tmp_path / name)
    return torch.load(tmp_path / name, weights_only=False)


def test_fsdp_bf16_train_resume_export(tmp_path):
    cache = tmp_path / "cache"
    _train(tmp_path, "a", cache)
    a = tmp_path / "a"
    ck = a / "checkpoints"
    assert "2 processes x batch 2 x accumulation 1 = 4 prompts per step" in (a / "log.txt").read_text()
    for step in (2, 3):
        assert (ck / f"step-{step}.complete.json").is_file()
        for part in ("accelerator_1", "accelerator_2"):  # sharded weights + optimiser, one file per rank
            d = ck / part / f"step-{step}"
            assert sorted(p.name for p in (d / "sharded").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
            assert not (d / "model.safetensors").exists() and not (d / "optimizer.bin").exists()
    assert (ck / "lora_gui" / "step-3" / "adapter_model.safetensors").is_file()

    # the same run, resumed at step 2 (a copy without step 3), must reproduce step 3 exactly
    b = tmp_path / "b"
    shutil.copytree(a, b)
    (b / "checkpoints" / "step-3.complete.json").unlink()
    proc = _train(tmp_path, "b", cache, "--resume-ckpt", "auto")
    assert "resumed from" in proc.stdout and "generator step 2" in proc.stdout
    ga, gb = (read_jsonl(tmp_path / e / "loss_logs" / "loss_gen_log.jsonl") for e in ("a", "b"))
    assert [r["step"] for r in ga] == [r["step"] for r in gb] == [1, 2, 3]
    assert [r["loss_dmd"] for r in ga] == [r["loss_dmd"] for r in gb]
    ua, ub = (read_jsonl(tmp_path / e / "loss_logs" / "loss_gui_log.jsonl") for e in ("a", "b"))
    assert [(r["inner_step"], r["loss_gui"]) for r in ua] == [(r["inner_step"], r["loss_gui"]) for r in ub]
    for part in ("accelerator_1", "accelerator_2"):
        sa = _consolidated(tmp_path, ck / part / "step-3", f"a-{part}.pt")
        sb = _consolidated(tmp_path, tmp_path / "b" / "checkpoints" / part / "step-3", f"b-{part}.pt")
        assert sa["model"].keys() == sb["model"].keys()
        assert all(torch.equal(v, sb["model"][k]) for k, v in sa["model"].items()), part

    # export consolidates the sharded generator: exactly the trained (unsharded) weights
    run_dmdr(["export", "--run", str(a), "--step", "latest", "--dtype", "fp32", "--out", str(tmp_path / "unet")], cache)
    exported = load_file(str(tmp_path / "unet" / "diffusion_pytorch_model.safetensors"))
    trained = _consolidated(tmp_path, ck / "accelerator_1" / "step-3", "gen.pt")["model"]
    assert exported.keys() == trained.keys()
    assert all(torch.equal(exported[k], v) for k, v in trained.items())
