"""A few-step (4-step) tiny run through the real CLI: its timesteps reach the export, `dmdr sample`
and a diffusers pipeline with the LCM scheduler; `--dtype` sets the exported precision."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from dmdr import cli
from helpers_train import env, run_dmdr, tiny_args

pytestmark = pytest.mark.slow
DMD2_STEPS = [999, 749, 499, 249]


@pytest.fixture(scope="module")
def four_step_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("four")
    cache = base / "cache"
    run_dmdr(tiny_args(base, "four", cache, "--sample-num-steps", "4", "--generator-timesteps", "999,749,499,249",
                       "--max-train-steps", "1", "--checkpoint-steps", "1", "--sample-steps", "100"), cache)
    return base / "four", cache


@pytest.fixture
def dmdr(four_step_run, monkeypatch):
    """The CLI in this process (sample/export pay no second start-up); asserts exit 0."""
    for key, value in env(four_step_run[1]).items():
        monkeypatch.setenv(key, value)

    def run(*argv: str) -> None:
        assert cli.main(list(argv)) == 0, argv

    return run


def _export_info(folder):
    return json.loads((folder / "dmdr_export.json").read_text())


def test_export_records_the_timesteps_and_the_chosen_dtype(four_step_run, dmdr, tmp_path):
    run, _ = four_step_run
    assert json.loads((run / "args.json").read_text())["generator_timesteps"] == DMD2_STEPS
    trained = load_file(str(run / "checkpoints" / "accelerator_1" / "step-1" / "model.safetensors"))
    for dtype, torch_dtype in (("bf16", torch.bfloat16), (None, torch.float16), ("fp32", torch.float32)):
        out = tmp_path / f"unet-{dtype}"
        dmdr("export", "--run", str(run), "--out", str(out), *(["--dtype", dtype] if dtype else []))
        info = _export_info(out)
        assert (info["num_steps"], info["timesteps"]) == (4, DMD2_STEPS)
        assert info["dtype"] == str(torch_dtype).removeprefix("torch.")
        saved = load_file(str(out / "diffusion_pytorch_model.safetensors"))
        assert saved.keys() == trained.keys() and {v.dtype for v in saved.values()} == {torch_dtype}
        assert all(torch.equal(v, trained[k].to(torch_dtype)) for k, v in saved.items())


def test_sample_and_the_lcm_pipeline_use_the_exported_timesteps(four_step_run, dmdr, tmp_path, capsys):
    run, cache = four_step_run
    dmdr("sample", "--run", str(run), "--prompt", "a red fox", "--out", str(tmp_path / "s"))
    sampled = json.loads((tmp_path / "s" / "sample.json").read_text())
    assert sampled["timesteps"] == DMD2_STEPS and sampled["images"][0]["image"] == "0000.png"

    dmdr("export", "--run", str(run), "--out", str(tmp_path / "unet"), "--dtype", "fp32")
    info = _export_info(tmp_path / "unet")
    # the export samples like the run: same timesteps, same image (fp32 keeps the weights exactly)
    capsys.readouterr()
    assert cli.main(["sample", "--run", str(tmp_path / "unet"), "--prompt", "a red fox", "--out", "x"]) == 2
    assert "is an exported UNet: pass --pretrained-model" in capsys.readouterr().err
    dmdr("sample", "--run", str(tmp_path / "unet"), "--pretrained-model", "builtin:tiny", "--cache-dir", str(cache),
         "--prompt", "a red fox", "--out", str(tmp_path / "e"))
    assert json.loads((tmp_path / "e" / "sample.json").read_text())["timesteps"] == DMD2_STEPS
    assert (tmp_path / "e" / "0000.png").read_bytes() == (tmp_path / "s" / "0000.png").read_bytes()
    from diffusers import LCMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    from dmdr.models.sdxl import resolve_pretrained

    # what dmdr_export.json tells a user to do, on the tiny base model
    pipe = StableDiffusionXLPipeline.from_pretrained(resolve_pretrained("builtin:tiny", cache),
                                                     unet=UNet2DConditionModel.from_pretrained(tmp_path / "unet"))
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red fox", num_inference_steps=len(info["timesteps"]), timesteps=info["timesteps"],
                 guidance_scale=0.0, height=64, width=64, output_type="np").images
    assert image.shape == (1, 64, 64, 3)
    assert pipe.scheduler.timesteps.tolist() == DMD2_STEPS


def test_a_multi_step_run_on_the_default_grid_records_its_timesteps(four_step_run, dmdr, tmp_path):
    """Defect: the export wrote `timesteps: null` for every step count but one."""
    run = tmp_path / "run"
    shutil.copytree(four_step_run[0], run)
    args = json.loads((run / "args.json").read_text())
    del args["generator_timesteps"]  # a run from before the option: linspace(999, 0, 5), rounded
    (run / "args.json").write_text(json.dumps(args))
    dmdr("export", "--run", str(run), "--out", str(tmp_path / "unet"))
    assert _export_info(tmp_path / "unet")["timesteps"] == [999, 749, 500, 250]
    dmdr("sample", "--run", str(run), "--prompt", "a red fox", "--out", str(tmp_path / "s"))
    assert json.loads((tmp_path / "s" / "sample.json").read_text())["timesteps"] == [999, 749, 500, 250]

    args.update(sample_num_steps=1, generator_timesteps=[500])  # one step: the list is the conditioning timestep
    (run / "args.json").write_text(json.dumps(args))
    dmdr("export", "--run", str(run), "--out", str(tmp_path / "one"))
    info = _export_info(tmp_path / "one")
    assert (info["num_steps"], info["conditioning_timestep"], info["timesteps"]) == (1, 500, [500])


def test_a_raw_unet_init_loads_for_four_steps(four_step_run, tmp_path):
    """Defect: --xl-ode-pretrain-path was silently ignored unless --sample-num-steps was 1, so a
    DMD2 4-step UNet could not be the init of a 4-step run."""
    from safetensors.torch import save_file

    from dmdr import components
    from dmdr.config import TrainConfig
    from dmdr.models.sdxl import load_sdxl, resolve_pretrained

    _, cache = four_step_run
    teacher = load_sdxl(resolve_pretrained("builtin:tiny", cache)).unet.state_dict()
    init = {k: v + 0.01 for k, v in teacher.items()}
    save_file(init, str(tmp_path / "dmd2_4step_unet.safetensors"))
    cfg = TrainConfig(pretrained_model="builtin:tiny", cache_dir=str(cache), sample_num_steps=4,
                      generator_timesteps=DMD2_STEPS, xl_ode_pretrain_path=str(tmp_path / "dmd2_4step_unet.safetensors"))
    generator = components.build_models(cfg, torch.device("cpu")).generator
    assert all(torch.equal(v, init[k]) for k, v in generator.state_dict().items())


def test_single_file_export_of_a_run_through_the_cli(four_step_run, dmdr, tmp_path, capsys):
    """`--format single-file`: the run's generator with the base's VAE and text encoders in one file whose
    header records the run's timesteps and name; the command says how to load it."""
    from safetensors import safe_open

    from dmdr.exports import sgm_keys

    run, _ = four_step_run
    capsys.readouterr()
    dmdr("export", "--run", str(run), "--format", "single-file", "--out", str(tmp_path / "four.safetensors"))
    printed = capsys.readouterr().out
    assert "exported generator (single-file, fp16)" in printed and "models/checkpoints" in printed
    assert "from_single_file" in printed
    trained = load_file(str(run / "checkpoints" / "accelerator_1" / "step-1" / "model.safetensors"))
    with safe_open(str(tmp_path / "four.safetensors"), "pt") as f:
        meta = f.metadata()
        conv_in = f.get_tensor(sgm_keys.UNET_PREFIX + "input_blocks.0.0.weight")
    assert json.loads(meta["dmdr.timesteps"]) == DMD2_STEPS
    assert (meta["dmdr.source_run"], meta["dmdr.source_step"]) == ("four", "1")
    assert meta["dmdr.base_model"] == "builtin:tiny"
    assert torch.equal(conv_in, trained["conv_in.weight"].to(torch.float16))
    assert cli.main(["export", "--run", str(run), "--format", "single-file", "--out", str(tmp_path / "dir")]) == 2
    assert "name it <something>.safetensors" in capsys.readouterr().err
