"""Stage 2 from stage 1: a NEW experiment from another run's checkpoint loads its weights and runs
at its own learning rates (the reference restores stage 1's optimiser and LR scheduler, so stage 2's
rate never applies); the same experiment's resume still restores everything (test_resume_equivalence).
The source may be a local run or an s3:// run (pulled and verified, real HTTP to moto)."""
import pytest
import torch
from safetensors.torch import load_file

from dmdr.storage import StorageConfig, Syncer
from helpers_s3 import aws_env, bucket, moto, s3_env  # noqa: F401 (fixtures)
from helpers_train import read_jsonl, run_dmdr, tiny_args

pytestmark = pytest.mark.slow
LR_1 = 1e-3  # stage 1
EPS32 = torch.finfo(torch.float32).eps
COMMON = ["--checkpoint-steps", "1", "--sample-steps", "100", "--ratio-update", "2"]
# stage 1: 2 generator updates, 5 guidance updates (inner steps 0..4); stage 2 (1 step): 1 and 3


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def stage1(tmp_path_factory, cache):
    out = tmp_path_factory.mktemp("stage1")
    run_dmdr(tiny_args(out, "s1", cache, "--max-train-steps", "2", "--learning-rate-gen", str(LR_1),
                       "--learning-rate-gui", str(LR_1), *COMMON), cache)
    return out / "s1"


def snapshot(run):
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in run.rglob("*") if p.is_file()}


def ckpt(run, step):
    ck = run / "checkpoints"
    gen = load_file(str(ck / "accelerator_1" / f"step-{step}" / "model.safetensors"))
    gui = load_file(str(ck / "lora_gui" / f"step-{step}" / "adapter_model.safetensors"))
    opts = [torch.load(ck / f"accelerator_{i}" / f"step-{step}" / "optimizer.bin", weights_only=True) for i in (1, 2)]
    return gen, gui, opts


def adam_steps(opt):
    return {int(s["step"]) for s in opt["state"].values()}


def check_stage2(run, proc, lr_gen, lr_gui):
    """Counters and logs from 0 at this run's rates; the log names the source and the rates."""
    gen = read_jsonl(run / "loss_logs" / "loss_gen_log.jsonl")
    gui = read_jsonl(run / "loss_logs" / "loss_gui_log.jsonl")
    assert [r["step"] for r in gen] == [1] and [r["inner_step"] for r in gui] == [0, 1, 2]
    assert [r["lr_gen"] for r in gen] == [lr_gen] and {r["lr_gui"] for r in gui} == {lr_gui}
    assert "new experiment from another run's checkpoint" in proc.stdout
    assert f"lr_gen {lr_gen:g}, lr_gui {lr_gui:g}" in proc.stdout
    _, _, opts = ckpt(run, 1)
    assert [g["lr"] for g in opts[0]["param_groups"]] == [lr_gen]
    assert [g["lr"] for g in opts[1]["param_groups"]] == [lr_gui]


def test_init_ckpt_loads_weights_with_fresh_optimisers_at_the_new_rate(tmp_path, cache, stage1):
    before = snapshot(stage1)
    lr = 1e-5
    proc = run_dmdr(tiny_args(tmp_path, "s2", cache, "--max-train-steps", "1", "--resume-ckpt", "auto",
                              "--init-ckpt", str(stage1), "--learning-rate-gen", str(lr),
                              "--learning-rate-gui", "2e-5", *COMMON), cache)
    check_stage2(tmp_path / "s2", proc, lr, 2e-5)
    assert "checkpoints/step-2:" in proc.stdout
    gen1, _, _ = ckpt(stage1, 1)
    gen2, _, _ = ckpt(stage1, 2)
    gen, _, opts = ckpt(tmp_path / "s2", 1)
    assert [adam_steps(o) for o in opts] == [{1}, {3}]  # fresh Adam: only this run's updates
    # one fresh AdamW step moves each weight by at most lr * (1 + wd |w|) from where it started:
    # stage 1's final weights (which stage 1's own step moved by far more than that)
    for k, w in gen.items():
        w1 = gen2[k].abs()
        assert torch.all((w - gen2[k]).abs() <= lr * (1 + 0.01 * w1) * 1.001 + 2 * EPS32 * w1 + 1e-12), k
    assert max((gen2[k] - gen1[k]).abs().max().item() for k in gen2) > 10 * lr
    assert snapshot(stage1) == before  # the source run is only read


def test_resume_ckpt_of_another_run_keeps_moments_on_request_at_the_new_rate(tmp_path, cache, stage1):
    # the reference's stage-2 form (--resume-ckpt .../torch_units/step-N.pt); rate 0 shows that
    # the new rate applies although the moments are kept: the weights stay stage 1's, exactly
    proc = run_dmdr(tiny_args(tmp_path, "s2", cache, "--max-train-steps", "1", "--init-keep-optimizer",
                              "--resume-ckpt", str(stage1 / "checkpoints" / "torch_units" / "step-2.pt"),
                              "--learning-rate-gen", "0", "--learning-rate-gui", "0", *COMMON), cache)
    check_stage2(tmp_path / "s2", proc, 0.0, 0.0)
    assert "Adam moments kept" in proc.stdout
    gen1, gui1, _ = ckpt(stage1, 2)
    gen, gui, opts = ckpt(tmp_path / "s2", 1)
    assert [adam_steps(o) for o in opts] == [{2 + 1}, {5 + 3}]  # stage 1's moments, continued
    assert gen.keys() == gen1.keys() and all(torch.equal(gen[k], gen1[k]) for k in gen)
    assert gui.keys() == gui1.keys() and all(torch.equal(gui[k], gui1[k]) for k in gui)
    # resuming this new run (its own checkpoint) restores everything, its rates included
    proc = run_dmdr(tiny_args(tmp_path, "s2", cache, "--max-train-steps", "2", "--resume-ckpt", "auto",
                              "--learning-rate-gen", "1e-5", *COMMON), cache)
    assert "resuming keeps this run's learning rates (lr_gen 0, lr_gui 0)" in proc.stdout
    assert [r["lr_gen"] for r in read_jsonl(tmp_path / "s2" / "loss_logs" / "loss_gen_log.jsonl")] == [0.0, 0.0]
    assert [adam_steps(o) for o in ckpt(tmp_path / "s2", 2)[2]] == [{2 + 2}, {5 + 5}]


def test_init_ckpt_from_s3_in_an_empty_dir(tmp_path, cache, stage1, moto, bucket):
    cfg = StorageConfig(s3_uri=f"s3://{bucket}/runs/s1", endpoint_url=moto.endpoint)
    with Syncer(stage1, cfg.s3_uri, cfg, sync_interval=0) as syncer:
        for step in (1, 2):
            syncer.submit_checkpoint(step)
            assert syncer.wait_checkpoint(timeout=60)
    s3 = ["--s3-endpoint-url", moto.endpoint, "--s3-uri", f"s3://{bucket}/runs2"]
    work = tmp_path / "pod"  # nothing of stage 1 on this disk
    # the run URI: its latest complete checkpoint; also this run's own restartable form
    proc = run_dmdr(tiny_args(work, "s2", cache, "--max-train-steps", "1", "--resume-ckpt", "auto",
                              "--init-ckpt", f"s3://{bucket}/runs/s1", "--learning-rate-gen", "3e-5",
                              "--learning-rate-gui", "3e-5", *COMMON, *s3), cache, **aws_env())
    assert "pulled checkpoint step-2" in proc.stdout and "(sha256 verified)" in proc.stdout
    assert "/init-ckpt/" in proc.stdout
    check_stage2(work / "s2", proc, 3e-5, 3e-5)
    assert (cache / "init-ckpt" / bucket / "runs" / "s1" / "checkpoints" / "step-2.complete.json").is_file()
    # a given step, through --resume-ckpt
    proc = run_dmdr(tiny_args(work, "s3", cache, "--max-train-steps", "1", "--resume-ckpt",
                              f"s3://{bucket}/runs/s1/step-1", "--learning-rate-gen", "3e-5",
                              "--learning-rate-gui", "3e-5", *COMMON, *s3), cache, **aws_env())
    assert "pulled checkpoint step-1" in proc.stdout and "checkpoints/step-1:" in proc.stdout
    check_stage2(work / "s3", proc, 3e-5, 3e-5)
