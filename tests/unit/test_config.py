"""Config precedence, presets, flag names and validation messages."""
import json
import subprocess
import sys

import pytest

from dmdr import config
from dmdr.cli import build_parser
from dmdr.errors import UserError

REFERENCE_FLAGS = [
    "--output-dir", "--exp-name", "--sample-steps", "--checkpoint-steps", "--max-train-steps",
    "--sample-num-steps", "--use-lora-gen", "--lora-rank", "--lora-scale-f", "--lora-scale-r",
    "--data-path-train", "--resolution", "--batch-size", "--batch-size-test", "--mixed-precision",
    "--use-8bit-adam", "--learning-rate-gen", "--learning-rate-gui", "--cold-start-iter", "--gen-a",
    "--gen-b", "--gui-a", "--gui-b", "--s-type-gen", "--s-type-gui", "--dynamic-step", "--ratio-update",
    "--cfg-r", "--cfg-f", "--clip-reward-model", "--hpsv2-reward-model", "--reward-clip-weight",
    "--reward-hps-weight", "--magic-prompt", "--resume-ckpt", "--seed", "--shift",
    "--xl-ode-pretrain-path", "--gradient-accumulation-steps",
]


def parse(argv):
    args = build_parser().parse_args(["train", *argv])
    return config.build_config({k: v for k, v in vars(args).items() if k not in ("command", "func")})


def test_every_reference_flag_exists():
    help_text = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    for flag in REFERENCE_FLAGS:
        assert flag in help_text, flag


def test_precedence_flag_over_file_over_preset(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("preset: sdxl-cold-start\nbatch-size: 3\nlora_rank: 8\n")
    cfg = parse(["--config", str(cfg_file), "--lora-rank", "16"])
    assert cfg.lora_rank == 16  # flag wins
    assert cfg.batch_size == 3  # file over preset (preset says 8)
    assert cfg.max_train_steps == 3001  # preset over default
    assert cfg.use_8bit_adam is True
    cfg = parse(["--config", str(cfg_file), "--preset", "tiny"])
    assert cfg.resolution == 64 and cfg.batch_size == 3


def test_presets_carry_reference_recipes():
    cold = parse(["--preset", "sdxl-cold-start"])
    refl = parse(["--preset", "sdxl-dmdr-refl"])
    assert (cold.learning_rate_gen, cold.batch_size, cold.cold_start_iter) == (1e-7, 8, 3001)
    assert (refl.learning_rate_gen, refl.batch_size, refl.cold_start_iter) == (5e-8, 4, 0)
    assert refl.max_train_steps == 1001  # stage 2 counts from 0: the reference's steps 3000..4001
    assert refl.magic_prompt == "Realistic photo" and refl.reward_hps_weight == 0.3
    assert cold.gui_a == 4.0 and cold.gui_b == 1.5 and cold.cfg_r == 7.0 and cold.ratio_update == 5


def test_four_step_preset_trains_on_dmd2_timesteps_in_one_run():
    four = parse(["--preset", "sdxl-4step-dmdr"])
    assert (four.sample_num_steps, four.generator_timesteps, four.xl_ode_pretrain_path) == (4, [999, 749, 499, 249], None)
    assert (four.cold_start_iter, four.max_train_steps, four.learning_rate_gen) == (3000, 4001, 1e-7)
    assert four.reward_clip_weight == four.reward_hps_weight == 0.3 and four.magic_prompt == "Realistic photo"
    assert "sdxl-4step-dmdr" in config.preset_names()


@pytest.mark.parametrize("text", ["999,749,499,249", "999 749 499 249", "[999, 749, 499, 249]"])
def test_generator_timesteps_list_from_a_flag(text, tmp_path):
    cfg = parse(["--sample-num-steps", "4", "--generator-timesteps", text])
    assert cfg.generator_timesteps == [999, 749, 499, 249]
    config.save_args(cfg, tmp_path / "args.json")
    assert json.loads((tmp_path / "args.json").read_text())["generator_timesteps"] == [999, 749, 499, 249]
    f = tmp_path / "c.yaml"
    f.write_text("sample-num-steps: 2\ngenerator-timesteps: [999, 499]\n")
    assert parse(["--config", str(f)]).generator_timesteps == [999, 499]


@pytest.mark.parametrize("argv, fragment", [
    (["--generator-timesteps", "999,749,499"], "3 timesteps for --sample-num-steps 4"),
    (["--generator-timesteps", "999,749,499,1000"], "must be in [0, 999]"),
    (["--generator-timesteps", "249,499,749,999"], "strictly descending"),
    (["--generator-timesteps", "999,749,749,249"], "strictly descending"),
    (["--generator-timesteps", "999,749,x,249"], "is not a list of integer timesteps"),
    (["--generator-timesteps", "999,749,499,249", "--shift", "3"], "--shift 3.0 does not apply"),
])
def test_generator_timesteps_list_is_checked(argv, fragment):
    with pytest.raises(UserError) as e:
        parse(["--sample-num-steps", "4", *argv])
    assert fragment in str(e.value) and "--generator-timesteps" in str(e.value)


def test_a_bad_timesteps_list_exits_2_with_one_line():
    proc = subprocess.run([sys.executable, "-m", "dmdr", "train", "--sample-num-steps", "4",
                           "--generator-timesteps", "999,500,750,250"], capture_output=True, text=True)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "strictly descending" in lines[0]


def test_checkpoint_sources_from_s3_are_checked_at_parse_time():
    assert parse(["--init-ckpt", "s3://bkt/runs/stage1/step-3000"]).init_ckpt == "s3://bkt/runs/stage1/step-3000"
    for flag in ("--init-ckpt", "--resume-ckpt"):
        with pytest.raises(UserError, match="invalid bucket name"):
            parse([flag, "s3://Bad_Bucket/runs/stage1"])


def test_booleans_are_real_booleans():
    assert parse(["--use-lora-gen"]).use_lora_gen is True
    assert parse(["--preset", "sdxl-cold-start", "--no-use-8bit-adam"]).use_8bit_adam is False


@pytest.mark.parametrize("argv, fragment", [
    (["--s-type-gen", "normal"], "--s-type-gen: 'normal' is not allowed; choose one of uniform, logit_normal"),
    (["--mixed-precision", "fp8"], "--mixed-precision"),
    (["--resolution", "100"], "--resolution"),
    (["--ratio-update", "0"], "--ratio-update"),
    (["--reward-hps-weight", "0.3"], "--hpsv2-reward-model"),
    (["--preset", "nope"], "unknown preset"),
])
def test_bad_values_name_the_option(argv, fragment):
    with pytest.raises(UserError, match=None) as e:
        parse(argv)
    assert fragment in str(e.value)


def test_bad_config_key(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("lora_rnak: 3\n")
    with pytest.raises(UserError, match="unknown option 'lora_rnak'"):
        parse(["--config", str(f)])


def test_cli_exits_2_with_one_line():
    proc = subprocess.run([sys.executable, "-m", "dmdr", "train", "--s-type-gui", "normal"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "--s-type-gui" in lines[0] and "uniform, logit_normal" in lines[0]


def test_args_json_roundtrip(tmp_path):
    cfg = parse(["--preset", "tiny", "--output-dir", str(tmp_path)])
    config.save_args(cfg, tmp_path / "args.json")
    assert json.loads((tmp_path / "args.json").read_text())["resolution"] == 64


def test_environment_sits_between_file_and_flags(tmp_path, monkeypatch):
    f = tmp_path / "c.yaml"
    f.write_text("s3_uri: s3://from-file/p\n")
    monkeypatch.setenv("DMDR_S3_URI", "s3://from-env/p")
    monkeypatch.setenv("DMDR_S3_PATH_STYLE", "true")
    cfg = parse(["--config", str(f)])
    assert cfg.s3_uri == "s3://from-env/p" and cfg.s3_path_style is True
    assert parse(["--config", str(f), "--s3-uri", "s3://flag/p"]).s3_uri == "s3://flag/p"
    monkeypatch.setenv("DMDR_S3_URI", "http://not-s3")
    with pytest.raises(UserError, match="--s3-uri"):
        parse([])
