"""`dmdr score` on a folder of real PNGs with tiny checkpoints in the real formats."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dmdr import score
from dmdr.models.tiny_clip import write_tiny_reward_checkpoints
from dmdr.rewards import RewardSet, RewardSpec
from helpers_rewards import colour_images, write_pngs

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("score")
    tiny = write_tiny_reward_checkpoints(base / "models", seed=3)
    images, captions = colour_images(size=48)
    # Names sort differently from the creation order on purpose: 10 < 2 < 3 < 9 by name.
    names = ["img-10.png", "img-2.png", "img-3.png", "img-9.png"]
    write_pngs(base / "images", images, names)
    (base / "prompts.txt").write_text("\n".join(captions) + "\n\n", encoding="utf-8")
    return base, tiny, names, captions


def _args(base, tiny, *extra):
    return [
        "--images", str(base / "images"), "--prompts", str(base / "prompts.txt"),
        "--clip-reward-model", str(tiny["clip"]), "--clip-reward-arch", str(tiny["config"]),
        "--hpsv2-reward-model", str(tiny["hps"]), "--hps-reward-arch", str(tiny["config"]),
        "--device", "cpu", *extra,
    ]


@pytest.mark.slow
def test_score_cli_writes_json_and_csv(setup, tmp_path):
    base, tiny, names, captions = setup
    out = tmp_path / "report" / "scores.csv"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "dmdr", "score", *_args(base, tiny, "--magic-prompt", "Realistic photo",
                                                       "--batch-size", "3", "--out", str(out))],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["count"] == 4
    assert [r["file"] for r in report["images"]] == sorted(names)
    # Sorted names pair with prompt lines in order, whatever order the files were written in.
    assert [r["prompt"] for r in report["images"]] == captions
    assert report["models"]["hps"]["prefix"] == "Realistic photo"

    # Same numbers as scoring the decoded PNGs in process through the reward API.
    pngs = torch.stack([score.load_image(base / "images" / r["file"]) for r in report["images"]])
    rewards = RewardSet([
        RewardSpec("clip", str(tiny["clip"]), arch=str(tiny["config"])),
        RewardSpec("hps", str(tiny["hps"]), arch=str(tiny["config"]), prefix="Realistic photo"),
    ])
    with torch.no_grad():
        expected = rewards.scores(pngs, captions)
    for name in ("clip", "hps"):
        got = torch.tensor([r[name] for r in report["images"]])
        torch.testing.assert_close(got, expected[name], atol=1e-5, rtol=0)
        assert report["mean"][name] == pytest.approx(expected[name].mean().item(), abs=1e-6)
    assert report["mean"]["hps_x100"] == pytest.approx(100 * report["mean"]["hps"])

    rows = list(csv.DictReader(out.open()))
    assert [r["file"] for r in rows] == sorted(names) + ["mean"]
    assert float(rows[-1]["hps_x100"]) == pytest.approx(report["mean"]["hps_x100"])
    assert "mean over 4 images" in proc.stdout and "hps_x100=" in proc.stdout


@pytest.mark.slow
def test_score_cli_count_mismatch_is_a_clear_error(setup, tmp_path):
    base, tiny, _, captions = setup
    prompts = tmp_path / "three.txt"
    prompts.write_text("\n".join(captions[:3]), encoding="utf-8")
    args = _args(base, tiny, "--out", str(tmp_path / "s.json"))
    args[args.index("--prompts") + 1] = str(prompts)
    proc = subprocess.run(
        [sys.executable, "-m", "dmdr", "score", *args], cwd=tmp_path, capture_output=True, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300,
    )
    assert proc.returncode == 2
    assert "4 images" in proc.stderr and "3 prompts" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "s.json").exists()


def test_score_main_in_process_json_only(setup, tmp_path, capsys):
    base, tiny, names, _ = setup
    out = tmp_path / "only.json"
    assert score.main(_args(base, tiny, "--out", str(out))) == 0
    report = json.loads(out.read_text())
    assert set(report["mean"]) == {"clip", "hps", "hps_x100"}
    assert not out.with_suffix(".csv").exists()
    assert "img-10.png" in capsys.readouterr().out


@pytest.mark.parametrize(
    "change, needle",
    [
        (("--clip-reward-model", "missing.bin"), "not found"),
        (("--out", "scores.txt"), ".json or .csv"),
        (("--images", "nowhere"), "not a folder"),
    ],
)
def test_score_main_bad_input_returns_2(setup, tmp_path, capsys, change, needle):
    base, tiny, _, _ = setup
    args = _args(base, tiny, "--out", str(tmp_path / "x.json"))
    flag, value = change
    args[args.index(flag) + 1] = str(tmp_path / value)
    assert score.main(args) == 2
    assert needle in capsys.readouterr().err


def test_score_needs_a_model(setup, capsys):
    base, _, _, _ = setup
    assert score.main(["--images", str(base / "images"), "--prompts", str(base / "prompts.txt")]) == 2
    err = capsys.readouterr().err
    assert "--hpsv2-reward-model" in err and err.count("dmdr score") == 1  # the prefix once, not twice


def test_score_report_lands_beside_the_images_not_in_the_working_dir(setup, tmp_path, monkeypatch, capsys):
    base, tiny, _, _ = setup
    images = tmp_path / "imgs"
    images.mkdir()
    for png in (base / "images").iterdir():
        (images / png.name).write_bytes(png.read_bytes())
    args = _args(base, tiny)
    args[args.index("--images") + 1] = str(images)
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    assert score.main(args) == 0
    assert json.loads((images / "scores.json").read_text())["count"] == 4
    assert list(cwd.iterdir()) == []
    assert f"wrote {images / 'scores.json'}" in capsys.readouterr().out
