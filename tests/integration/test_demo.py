"""`dmdr demo`: both stages of the recipe for real (cold start, then DMD + ReFL from its checkpoint),
and the commands it prints work on what it wrote."""
import argparse
import json
import shlex
from pathlib import Path

import pytest

from dmdr.cli import build_parser, main
from helpers_train import read_jsonl, run_dmdr


@pytest.mark.slow
def test_demo_trains_two_stages_and_prints_working_next_commands(tmp_path, capsys):
    cache, out = tmp_path / "cache", tmp_path / "out"
    # a store in the environment must not be used: the demo is local (this endpoint refuses at once)
    proc = run_dmdr(["demo", "--output-dir", str(out), "--steps", "2", "--cache-dir", str(cache)], cache,
                    DMDR_S3_URI="s3://not-for-the-demo/runs", DMDR_S3_ENDPOINT_URL="http://127.0.0.1:9")
    root = out / "demo"
    stage1, stage2 = root / "cold-start", root / "refl"

    cold = read_jsonl(stage1 / "loss_logs" / "loss_gen_log.jsonl")
    assert [r["step"] for r in cold] == [1, 2]
    assert all(r["clip"] == 0 and r["hps"] == 0 and r["loss_gen"] == r["loss_dmd"] for r in cold)
    refl = read_jsonl(stage2 / "loss_logs" / "loss_gen_log.jsonl")
    assert [r["step"] for r in refl] == [1, 2]
    assert all(r["clip"] != 0 and r["hps"] != 0 and r["loss_gen"] != r["loss_dmd"] for r in refl)
    assert "sample_clip" in refl[-1] and "sample_hps" in refl[-1]
    assert json.loads((stage2 / "args.json").read_text())["init_ckpt"] == str(stage1)
    assert "starting from --init-ckpt" in (stage2 / "log.txt").read_text()
    assert "| clip 0 | hps 0 |" in proc.stdout and "| clip 0 |" not in proc.stdout.split("stage 2/2")[1]

    lines = proc.stdout.split("\nnext:\n", 1)[1].splitlines()
    commands = [shlex.split(line) for line in lines if line.startswith("  dmdr ")]
    assert [c[1] for c in commands] == ["sample", "score", "export", "plot"]
    for argv in commands:
        opts = dict(zip(argv[2::2], argv[3::2]))
        for flag in ("--run", "--prompts", "--hpsv2-reward-model", "--hps-reward-arch"):
            if flag in opts:
                assert Path(opts[flag]).exists(), (flag, argv)
        if "--run" in opts:
            assert opts["--run"] == str(stage2)
    # run them in their printed order (`dmdr plot` once that command exists)
    known = next(a.choices for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    capsys.readouterr()
    for argv in commands:
        if argv[1] in known:
            assert main(argv[1:]) == 0, argv
    printed = capsys.readouterr().out
    assert printed.count(str(root / "samples")) >= 4 and "mean over 4 images: hps=" in printed
    assert (root / "scores.json").is_file() and (root / "unet" / "config.json").is_file()


def test_demo_refuses_an_earlier_demo_without_overwrite(tmp_path, capsys):
    earlier = tmp_path / "demo" / "refl"
    earlier.mkdir(parents=True)
    (earlier / "log.txt").write_text("an earlier run\n")
    assert main(["demo", "--output-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(earlier) in err and "--overwrite" in err
    assert not (tmp_path / "demo" / "rewards").exists()  # nothing written before the refusal


def test_demo_rejects_zero_steps(tmp_path, capsys):
    assert main(["demo", "--output-dir", str(tmp_path), "--steps", "0"]) == 2
    assert "--steps 0" in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()
