"""The tiny preset end to end through the real CLI: layout, resume, logs, sample, export."""
import json

import pytest
import torch
from safetensors.torch import load_file

from helpers_train import read_jsonl, run_dmdr, tiny_args

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def run6(tmp_path_factory, cache):
    out = tmp_path_factory.mktemp("out")
    proc = run_dmdr(tiny_args(out, "e", cache, "--max-train-steps", "6", "--checkpoint-steps", "3",
                              "--sample-steps", "3"), cache)
    return out / "e", proc


def test_layout(run6):
    run, proc = run6
    ck = run / "checkpoints"
    for step in (3, 6):
        assert (ck / f"step-{step}.complete.json").is_file()
        assert (ck / "accelerator_1" / f"step-{step}" / "model.safetensors").is_file()
        assert (ck / "accelerator_1" / f"step-{step}" / "optimizer.bin").is_file()
        assert (ck / "accelerator_2" / f"step-{step}" / "optimizer.bin").is_file()
        assert not (ck / "accelerator_2" / f"step-{step}" / "model.safetensors").exists()  # frozen teacher not saved
        assert any((ck / "lora_gui" / f"step-{step}").iterdir())
        assert (ck / "torch_units" / f"step-{step}.pt").is_file()
    assert not (ck / "lora_gen").exists()
    marker = json.loads((ck / "step-6.complete.json").read_text())
    assert marker["step"] == 6 and all((run / f["path"]).stat().st_size == f["size"] for f in marker["files"])
    assert sorted(p.name for p in (run / "samples").iterdir()) == [
        "step-000003_seed-30.json", "step-000003_seed-30.png", "step-000006_seed-30.json", "step-000006_seed-30.png"]
    grid = json.loads((run / "samples" / "step-000006_seed-30.json").read_text())  # the prompts beside the PNG
    assert (grid["step"], grid["seed"], grid["rows"], grid["cols"]) == (6, 30, 1, 2)  # 2 images side by side
    assert [(t["row"], t["col"]) for t in grid["tiles"]] == [(0, 0), (0, 1)] and all(t["prompt"] for t in grid["tiles"])
    line = next(x for x in (run / "log.txt").read_text().splitlines() if "step 6/6 |" in x)
    assert "| loss_gui " in line and "| lr 0.0001" in line and "ETA 00:00:00" in line
    args = json.loads((run / "args.json").read_text())
    assert args["max_train_steps"] == 6 and args["resolution"] == 64
    assert "step 6/6" in (run / "log.txt").read_text()
    assert "\r" not in proc.stdout
    gen = read_jsonl(run / "loss_logs" / "loss_gen_log.jsonl")
    assert [r["step"] for r in gen] == [1, 2, 3, 4, 5, 6]  # stops exactly at max-train-steps
    for r in gen:
        assert {"loss_dmd", "loss_gen", "clip", "hps", "lr_gen", "time", "inner_step"} <= set(r)
    gui = read_jsonl(run / "loss_logs" / "loss_gui_log.jsonl")
    assert [r["inner_step"] for r in gui] == list(range(len(gui)))
    assert f"outputs: {run}" in proc.stdout


def test_resume_auto_appends(run6, cache):
    run, _ = run6
    out = run.parent
    proc = run_dmdr(tiny_args(out, "e", cache, "--max-train-steps", "9", "--checkpoint-steps", "3",
                              "--sample-steps", "3", "--resume-ckpt", "auto"), cache)
    assert "resumed from" in proc.stdout and "generator step 6" in proc.stdout
    gen = read_jsonl(run / "loss_logs" / "loss_gen_log.jsonl")
    assert [r["step"] for r in gen] == list(range(1, 10))
    gui = read_jsonl(run / "loss_logs" / "loss_gui_log.jsonl")
    assert [r["inner_step"] for r in gui] == list(range(len(gui)))
    assert (run / "checkpoints" / "step-9.complete.json").is_file()


def test_incomplete_checkpoint_is_ignored(tmp_path, cache):
    out = tmp_path
    run_dmdr(tiny_args(out, "x", cache, "--max-train-steps", "2", "--checkpoint-steps", "1", "--sample-steps", "100"), cache)
    ck = out / "x" / "checkpoints"
    (ck / "step-2.complete.json").unlink()  # as if killed before the marker was written
    proc = run_dmdr(tiny_args(out, "x", cache, "--max-train-steps", "3", "--checkpoint-steps", "1",
                              "--sample-steps", "100", "--resume-ckpt", "auto"), cache)
    assert "generator step 1" in proc.stdout
    assert [r["step"] for r in read_jsonl(out / "x" / "loss_logs" / "loss_gen_log.jsonl")] == [1, 2, 3]


def test_corrupt_checkpoint_message(tmp_path, cache):
    run_dmdr(tiny_args(tmp_path, "c", cache, "--max-train-steps", "1", "--checkpoint-steps", "1", "--sample-steps", "100"), cache)
    units = tmp_path / "c" / "checkpoints" / "torch_units" / "step-1.pt"
    units.write_bytes(units.read_bytes()[:20])
    proc = run_dmdr(tiny_args(tmp_path, "c", cache, "--max-train-steps", "2", "--resume-ckpt", str(units)),
                    cache, check=False)
    assert proc.returncode == 2
    # the marker's sizes catch the truncation before anything is loaded, and the line says what to do
    assert "checkpoint step-1" in proc.stderr and "is damaged: checkpoints/torch_units/step-1.pt is 20 bytes" in proc.stderr
    assert "--resume-ckpt auto" in proc.stderr and "Traceback" not in proc.stderr


def test_sample_and_export(run6, cache, tmp_path):
    run, _ = run6
    proc = run_dmdr(["sample", "--run", str(run), "--step", "6", "--prompt", "a red fox", "--out", str(tmp_path / "s")], cache)
    assert (tmp_path / "s" / "0000.png").is_file()
    latest = max(int(p.name.split("-")[1].split(".")[0]) for p in (run / "checkpoints").glob("step-*.complete.json"))
    run_dmdr(["export", "--run", str(run), "--step", "latest", "--out", str(tmp_path / "unet"), "--dtype", "fp32"], cache)
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tmp_path / "unet")
    trained = load_file(str(run / "checkpoints" / "accelerator_1" / f"step-{latest}" / "model.safetensors"))
    for k, v in unet.state_dict().items():
        assert torch.equal(v, trained[k]), k


def test_keep_last_retention(tmp_path, cache):
    run_dmdr(tiny_args(tmp_path, "k", cache, "--max-train-steps", "4", "--checkpoint-steps", "1",
                       "--sample-steps", "100", "--keep-last", "2"), cache)
    ck = tmp_path / "k" / "checkpoints"
    assert sorted(p.name for p in ck.glob("step-*.complete.json")) == ["step-3.complete.json", "step-4.complete.json"]
    for part in ("accelerator_1", "accelerator_2", "lora_gui"):
        assert sorted(p.name for p in (ck / part).iterdir()) == ["step-3", "step-4"]
    assert sorted(p.name for p in (ck / "torch_units").iterdir()) == ["step-3.pt", "step-4.pt"]
