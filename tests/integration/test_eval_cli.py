"""`dmdr eval` on a real tiny run of 2 checkpoints: CLIP, HPS and FID rows, CSV and PNG; a
killed eval continues with the step it had not finished; user errors are one line, exit 2."""
from __future__ import annotations

import csv
import json
import shutil
import signal
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

from dmdr import cli, inference
from dmdr.evaluation import fid
from dmdr.models.tiny_clip import write_tiny_reward_checkpoints
from dmdr.rewards import RewardSet, RewardSpec
from helpers_eval import write_tiny_extractor
from helpers_rewards import colour_images, write_pngs
from helpers_train import DMDR, REPO, env, run_dmdr, tiny_args

pytestmark = pytest.mark.slow
PROMPTS = ["a red fox", "a blue boat", "a green hill"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny run with checkpoints at steps 1 and 2, the tiny scorers and a reference folder."""
    base = tmp_path_factory.mktemp("eval")
    cache = base / "cache"
    run_dmdr(tiny_args(base, "exp", cache, "--max-train-steps", "2", "--checkpoint-steps", "1",
                       "--sample-steps", "100"), cache)
    tiny = write_tiny_reward_checkpoints(base / "models", seed=3)
    (base / "prompts.txt").write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    write_pngs(base / "ref", colour_images(size=64)[0], [f"{i}.png" for i in range(4)])
    write_tiny_extractor(base / "models" / "tiny-inception.pt")
    return base, cache, tiny


def _args(base, tiny, run, *extra):
    return ["eval", "--run", str(run), "--steps", "all", "--prompts", str(base / "prompts.txt"),
            "--metrics", "clip,hps,fid", "--num-images", "5", "--batch-size", "2", "--device", "cpu",
            "--ref-images", str(base / "ref"), "--inception", str(base / "models" / "tiny-inception.pt"),
            "--clip-reward-model", str(tiny["clip"]), "--clip-reward-arch", str(tiny["config"]),
            "--hpsv2-reward-model", str(tiny["hps"]), "--hps-reward-arch", str(tiny["config"]), *extra]


def _copy_run(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_eval_all_steps_then_a_killed_eval_continues(tiny_run, tmp_path, monkeypatch, capsys):
    base, cache, tiny = tiny_run
    run = _copy_run(base / "exp", tmp_path / "exp")
    # killed once step 1's row is written: the rerun evaluates step 2 only
    proc = subprocess.Popen(DMDR + _args(base, tiny, run), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env(cache), cwd=REPO)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("step 1: clip="):
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "".join(lines)
    assert "step 1: 2/5 images sampled and scored\n" in lines  # progress lines, batches of 2
    first = [json.loads(line) for line in (run / "eval" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in first] == [1]

    for key, value in env(cache).items():
        monkeypatch.setenv(key, value)
    capsys.readouterr()
    assert cli.main(_args(base, tiny, run)) == 0
    out = capsys.readouterr().out
    assert "step 1:" not in out and "step 2: 5/5 images sampled and scored" in out
    assert "already in" in out and "steps [1]" in out
    rows = [json.loads(line) for line in (run / "eval" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and rows[0] == first[0]
    assert all(set(r) >= {"clip", "hps", "hps_x100", "fid", "num_images", "key"} for r in rows)
    assert rows[0]["key"] == rows[1]["key"] and rows[1]["num_images"] == 5
    table = list(csv.DictReader((run / "eval" / "metrics.csv").open()))
    assert [int(r["step"]) for r in table] == [1, 2]
    assert float(table[1]["fid"]) == pytest.approx(rows[1]["fid"])
    assert Image.open(run / "eval" / "metrics.png").size[1] > 400  # three panels
    assert (run / "eval" / "fid-ref-stats.npz").is_file()

    # the numbers are the reward models' and the Frechet distance of the same images, computed directly
    cfg = inference.load_run_config(run)
    parts, unet = inference.load_generator(cfg, run, 2, torch.device("cpu"))
    prompts = [PROMPTS[i % 3] for i in range(5)]
    images = torch.cat([inference.sample_images(cfg, parts, unet, PROMPTS, 2026, torch.device("cpu")),
                        inference.sample_images(cfg, parts, unet, PROMPTS[:2], 2027, torch.device("cpu"))])
    rewards = RewardSet([RewardSpec("clip", str(tiny["clip"]), arch=str(tiny["config"])),
                         RewardSpec("hps", str(tiny["hps"]), arch=str(tiny["config"]))])
    with torch.no_grad():
        expected = rewards.scores(images, prompts)
    assert rows[1]["clip"] == pytest.approx(expected["clip"].mean().item(), abs=1e-5)
    assert rows[1]["hps_x100"] == pytest.approx(100 * expected["hps"].mean().item(), abs=1e-3)
    model = fid.load_extractor(base / "models" / "tiny-inception.pt")
    ref = fid.statistics(fid.features(model, colour_images(size=64)[0]))
    got = fid.statistics(fid.features(model, images))
    assert rows[1]["fid"] == pytest.approx(fid.frechet_distance(*got, *ref), rel=1e-4, abs=1e-6)

    # same settings again: nothing to do; the saved reference statistics (another key) give the same FID
    assert cli.main(_args(base, tiny, run, "--steps", "2")) == 0
    assert "evaluated 0 step(s)" in capsys.readouterr().out
    stats = run / "eval" / "fid-ref-stats.npz"
    args = _args(base, tiny, run, "--steps", "2")
    i = args.index("--ref-images")
    args[i:i + 2] = ["--ref-stats", str(stats)]
    assert cli.main(args) == 0
    again = [json.loads(line) for line in (run / "eval" / "metrics.jsonl").read_text().splitlines()]
    assert again[1]["fid"] == pytest.approx(rows[1]["fid"], rel=1e-6) and np.isfinite(again[1]["fid"])
    # the full SDXL VAE instead of the run's tiny one: other images, so another row for the step
    assert cli.main(args + ["--vae", "full"]) == 0
    full = [json.loads(line) for line in (run / "eval" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in full] == [1, 2] and full[1]["key"] != again[1]["key"]
    assert full[1]["clip"] != pytest.approx(again[1]["clip"], abs=1e-7)


@pytest.mark.parametrize("change, needle", [
    (("--prompts", "missing.txt"), "missing.txt does not exist"),
    (("--metrics", "clip,lpips"), "unknown metric lpips"),
    (("--inception", "nowhere.pt"), "nowhere.pt not found"),
    (("--clip-reward-model", "nope.bin"), "nope.bin not found"),
    (("--ref-images", None), "--metrics fid needs a reference"),
    (("--steps", "1,7"), "no complete checkpoint for step(s) [7]"),
    (("--ref-stats", "ref.npz"), "one FID reference"),
    (("--num-images", "1"), "--num-images 2 or more"),
    (("--run", "nowhere"), "nowhere has no args.json"),
    (("--device", "cuda"), "no CUDA device is available here"),
])
def test_eval_user_errors_are_one_line_exit_2(tiny_run, tmp_path, monkeypatch, capsys, change, needle):
    base, cache, tiny = tiny_run
    if change[0] == "--device" and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    monkeypatch.chdir(tmp_path)
    args = _args(base, tiny, base / "exp")
    flag, value = change
    if flag not in args:
        args += [flag, value]
    elif value is None:
        del args[args.index(flag):args.index(flag) + 2]
    else:
        args[args.index(flag) + 1] = value
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert not (base / "exp" / "eval").exists()
