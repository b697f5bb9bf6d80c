"""`dmdr export --format lora` through the real CLI on a tiny `--use-lora-gen` run: the LoRA that diffusers'
`load_lora_weights` puts on the base equals the `--format diffusers` export, and misuse is one line, exit 2."""
import json

import pytest
import torch

from dmdr import cli
from helpers_models import eps_of
from helpers_train import env, readme_commands, run_dmdr, tiny_args

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("lora")
    cache = base / "cache"
    run_dmdr(tiny_args(base, "lora", cache, "--use-lora-gen", "--max-train-steps", "1", "--checkpoint-steps", "1",
                       "--sample-steps", "100"), cache)
    return base / "lora", cache


@pytest.fixture
def dmdr(lora_run, monkeypatch):
    for key, value in env(lora_run[1]).items():
        monkeypatch.setenv(key, value)
    return lambda *argv: cli.main(list(argv))


def test_cli_lora_export_loads_in_diffusers_as_the_merged_generator(lora_run, dmdr, tmp_path, capsys):
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    from dmdr.models.sdxl import resolve_pretrained

    run, cache = lora_run
    assert dmdr("export", "--run", str(run), "--out", str(tmp_path / "unet"), "--dtype", "fp32") == 0
    assert dmdr("export", "--run", str(run), "--out", str(tmp_path / "my-lora"), "--format", "lora",
                "--dtype", "fp32") == 0
    info = json.loads((tmp_path / "my-lora" / "dmdr_export.json").read_text())
    assert info["files"] == {"diffusers": "pytorch_lora_weights.safetensors", "kohya": "my-lora_kohya.safetensors"}
    merged = eps_of(UNet2DConditionModel.from_pretrained(tmp_path / "unet").eval())
    for weights in info["files"].values():
        pipe = StableDiffusionXLPipeline.from_pretrained(resolve_pretrained("builtin:tiny", cache))
        pipe.load_lora_weights(str(tmp_path / "my-lora"), weight_name=weights)
        assert torch.allclose(eps_of(pipe.unet.eval()), merged, rtol=1e-5, atol=1e-5), weights

    capsys.readouterr()
    assert dmdr("export", "--run", str(run), "--out", str(tmp_path / "x"), "--format", "lora",
                "--extract-lora", "8") == 2
    assert "trained a LoRA generator (--use-lora-gen)" in capsys.readouterr().err
    assert dmdr("export", "--run", str(run), "--out", str(tmp_path / "x"), "--extract-lora", "8") == 2
    err = capsys.readouterr().err
    assert "--extract-lora is an option of --format lora" in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()


def test_cli_refuses_a_lora_the_run_cannot_give_before_loading_it(lora_run, dmdr, tmp_path, capsys):
    """The run's args.json decides: a folder with only that (no checkpoint, no models) gets the option's error."""
    run, _ = lora_run
    bare = tmp_path / "full-run"
    bare.mkdir()
    args = json.loads((run / "args.json").read_text())
    (bare / "args.json").write_text(json.dumps({**args, "use_lora_gen": False}))
    capsys.readouterr()
    assert dmdr("export", "--run", str(bare), "--out", str(tmp_path / "x"), "--format", "lora") == 2
    err = capsys.readouterr().err
    assert "fine-tuned the full UNet (no --use-lora-gen); add --extract-lora RANK" in err, err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "x").exists()


def test_readme_export_commands_run_as_written(lora_run, dmdr, tmp_path, monkeypatch):
    """Every local `dmdr export` line of the README's "Exporting" section, in a folder where runs/exp is
    a --use-lora-gen run and runs/full a full fine-tune (the s3:// line: test_use_model_flow.py)."""
    run, cache = lora_run
    run_dmdr(tiny_args(tmp_path / "runs", "full", cache, "--max-train-steps", "1", "--checkpoint-steps", "1",
                       "--sample-steps", "100"), cache)
    (tmp_path / "runs" / "exp").symlink_to(run)
    monkeypatch.chdir(tmp_path)
    commands = readme_commands("### Exporting", every_block=True)
    local = [c for c in commands if not any(a.startswith("s3://") for a in c)]
    assert len(commands) - len(local) == 1 and {c[1] for c in commands} == {"export"}
    assert {c[c.index("--format") + 1] if "--format" in c else "diffusers" for c in local} == {
        "diffusers", "lora", "single-file"}
    for argv in local:  # the two lora lines write one folder: the second replaces the first's
        assert dmdr(*argv[1:]) == 0, argv
    assert (tmp_path / "sdxl-dmdr-unet" / "dmdr_export.json").is_file()
    assert (tmp_path / "sdxl-dmdr.safetensors").stat().st_size > 1_000_000
    info = json.loads((tmp_path / "sdxl-dmdr-lora" / "dmdr_export.json").read_text())
    assert info["source"] == "extracted" and info["rank"] >= 1
