"""N steps straight == N/2 steps + resume + N/2 steps: same losses, same weights (CPU, deterministic)."""
import pytest
import torch
from safetensors.torch import load_file

from helpers_train import read_jsonl, run_dmdr, tiny_args

pytestmark = pytest.mark.slow
COMMON = ["--checkpoint-steps", "2", "--sample-steps", "2", "--ratio-update", "2"]


def _weights(run, step):
    ck = run / "checkpoints"
    gen = load_file(str(ck / "accelerator_1" / f"step-{step}" / "model.safetensors"))
    gui = {}
    for f in (ck / "lora_gui" / f"step-{step}").glob("*.safetensors"):
        gui.update(load_file(str(f)))
    return gen, gui


def test_resume_is_exact(tmp_path):
    cache = tmp_path / "cache"
    run_dmdr(tiny_args(tmp_path, "straight", cache, "--max-train-steps", "4", *COMMON), cache)
    run_dmdr(tiny_args(tmp_path, "split", cache, "--max-train-steps", "2", *COMMON), cache)
    run_dmdr(tiny_args(tmp_path, "split", cache, "--max-train-steps", "4", "--resume-ckpt", "auto", *COMMON), cache)

    a = read_jsonl(tmp_path / "straight" / "loss_logs" / "loss_gen_log.jsonl")
    b = read_jsonl(tmp_path / "split" / "loss_logs" / "loss_gen_log.jsonl")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4]
    assert [r["loss_dmd"] for r in a] == [r["loss_dmd"] for r in b]
    ga = read_jsonl(tmp_path / "straight" / "loss_logs" / "loss_gui_log.jsonl")
    gb = read_jsonl(tmp_path / "split" / "loss_logs" / "loss_gui_log.jsonl")
    assert [r["loss_gui"] for r in ga] == [r["loss_gui"] for r in gb]

    gen_a, gui_a = _weights(tmp_path / "straight", 4)
    gen_b, gui_b = _weights(tmp_path / "split", 4)
    assert gen_a.keys() == gen_b.keys() and gui_a.keys() == gui_b.keys() and gui_a
    assert all(torch.equal(gen_a[k], gen_b[k]) for k in gen_a)
    assert all(torch.equal(gui_a[k], gui_b[k]) for k in gui_a)
    # and training did change the generator
    gen_2, _ = _weights(tmp_path / "straight", 2)
    assert any(not torch.equal(gen_a[k], gen_2[k]) for k in gen_a)
