"""ODE init loading, LoRA save/load, generator export (merge + diffusers round trip)."""

from __future__ import annotations

import copy
import json
import os
import stat

import pytest
import torch
from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
from helpers_models import RES, eps_of, randomize_lora_b, single_thread, tiny_path, tiny_unet, unet_inputs  # noqa: F401  (fixtures)
from safetensors.torch import load_file, save_file

from dmdr.errors import UserError
from dmdr.exports.diffusers_unet import export_unet
from dmdr.models import (
    LORA_TARGET_MODULES,
    add_generator_lora,
    add_guidance_lora,
    has_lora,
    load_lora,
    load_ode_init,
    lora_state_dict,
    predict_eps,
    save_lora,
)


# ----------------------------------------------------------------------------- ODE init
@pytest.mark.parametrize("suffix", [".bin", ".safetensors"])
def test_ode_init_loads_a_raw_state_dict(tiny_path, tmp_path, suffix):
    donor = tiny_unet(tiny_path)
    with torch.no_grad():
        for p in donor.parameters():
            p.add_(0.01)
    state = {k: v.contiguous() for k, v in donor.state_dict().items()}
    file = tmp_path / f"ode{suffix}"
    torch.save(state, file) if suffix == ".bin" else save_file(state, str(file))
    target = tiny_unet(tiny_path)
    load_ode_init(target, str(file))
    assert all(torch.equal(a, b) for a, b in zip(target.state_dict().values(), state.values()))
    assert torch.equal(eps_of(target), eps_of(donor))


def test_ode_init_errors_name_the_file(tiny_path, tmp_path):
    unet = tiny_unet(tiny_path)
    cases = {}
    cases["missing"] = tmp_path / "nope.bin"
    cases["garbage"] = tmp_path / "garbage.bin"
    cases["garbage"].write_bytes(b"not a checkpoint")
    cases["bad_safetensors"] = tmp_path / "bad.safetensors"
    cases["bad_safetensors"].write_bytes(b"\x00" * 16)
    state = unet.state_dict()
    partial = dict(list(state.items())[:-1])
    cases["missing_key"] = tmp_path / "partial.safetensors"
    save_file({k: v.contiguous() for k, v in partial.items()}, str(cases["missing_key"]))
    cases["wrapped"] = tmp_path / "wrapped.bin"
    torch.save({"state_dict": state}, cases["wrapped"])
    cases["pickle"] = tmp_path / "pickle.bin"
    torch.save({"conv_in.weight": object()}, cases["pickle"])  # weights_only refuses it
    for name, file in cases.items():
        with pytest.raises(UserError, match="raw diffusers UNet state_dict") as err:
            load_ode_init(unet, str(file))
        assert str(file) in str(err.value), name
    assert torch.equal(eps_of(unet), eps_of(tiny_unet(tiny_path)))  # failed loads left the model untouched


# ----------------------------------------------------------------------------- LoRA files
def test_save_load_lora_round_trip(tiny_path, tmp_path):
    source = tiny_unet(tiny_path)
    add_guidance_lora(source, rank=4)
    randomize_lora_b(source)
    save_lora(source, tmp_path / "lora_gui" / "step-5")
    assert (tmp_path / "lora_gui" / "step-5" / "adapter_model.safetensors").is_file()

    fresh = tiny_unet(tiny_path)
    add_guidance_lora(fresh, rank=4)
    load_lora(fresh, tmp_path / "lora_gui" / "step-5")
    saved = lora_state_dict(source)
    assert saved.keys() == lora_state_dict(fresh).keys()
    assert all(torch.equal(saved[k], v) for k, v in lora_state_dict(fresh).items())
    assert torch.equal(eps_of(fresh), eps_of(source))

    bare = tiny_unet(tiny_path)  # no adapter yet: load_lora adds the saved one
    load_lora(bare, tmp_path / "lora_gui" / "step-5")
    assert has_lora(bare) and torch.equal(eps_of(bare), eps_of(source))


def test_lora_checkpoint_is_peft_own_serialisation(tiny_path, tmp_path):
    """The checkpoint adapter file holds what peft's get_peft_model_state_dict gives, key for key, and peft's
    set_peft_model_state_dict reads it: the format needs no change, and checkpoints of every dmdr so far load."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    source = tiny_unet(tiny_path)
    add_generator_lora(source, rank=4, alpha=8)
    randomize_lora_b(source)
    folder = save_lora(source, tmp_path / "lora_gen" / "step-3")
    saved = load_file(str(folder / "adapter_model.safetensors"))
    peft_own = get_peft_model_state_dict(source)
    assert saved.keys() == peft_own.keys() and all(torch.equal(saved[k], v) for k, v in peft_own.items())
    fresh = tiny_unet(tiny_path)
    add_generator_lora(fresh, rank=4, alpha=8)
    result = set_peft_model_state_dict(fresh, saved)
    assert not result.unexpected_keys and torch.equal(eps_of(fresh), eps_of(source))


def test_load_lora_mismatch_is_a_user_error(tiny_path, tmp_path):
    source = tiny_unet(tiny_path)
    add_guidance_lora(source, rank=4)
    folder = save_lora(source, tmp_path / "lora")
    other = tiny_unet(tiny_path)
    add_guidance_lora(other, rank=8)
    with pytest.raises(UserError, match=str(folder)):
        load_lora(other, folder)
    (folder / "adapter_model.safetensors").unlink()
    with pytest.raises(UserError, match="missing or unreadable"):
        load_lora(source, folder)
    trimmed = dict(list(lora_state_dict(source).items())[1:])
    save_lora(source, folder)
    save_file({k: v.contiguous() for k, v in trimmed.items()}, str(folder / "adapter_model.safetensors"))
    with pytest.raises(UserError, match="does not fit this UNet"):
        load_lora(tiny_unet(tiny_path), folder)


# ----------------------------------------------------------------------------- export
def test_export_merges_lora_and_loads_into_the_pipeline(tiny_path, tmp_path):
    generator = tiny_unet(tiny_path)
    add_generator_lora(generator, rank=8, alpha=16)
    assert generator.peft_config["default"].lora_alpha == 16
    randomize_lora_b(generator)
    before = {k: v.clone() for k, v in lora_state_dict(generator).items()}
    expected = eps_of(generator)

    out = export_unet(generator, tmp_path / "export", conditioning_timestep=399, num_steps=1)
    assert has_lora(generator) and all(torch.equal(before[k], v) for k, v in lora_state_dict(generator).items())
    assert torch.equal(eps_of(generator), expected)  # the training model is untouched
    info = json.loads((out / "dmdr_export.json").read_text())
    assert (info["conditioning_timestep"], info["num_steps"], info["timesteps"]) == (399, 1, [399])
    assert (out / "diffusion_pytorch_model.safetensors").is_file()

    merged = UNet2DConditionModel.from_pretrained(out)
    assert not any("lora" in k or "base_layer" in k for k in merged.state_dict())
    assert torch.allclose(eps_of(merged), expected, rtol=1e-4, atol=1e-4)

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_path, unet=merged)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a cat", num_inference_steps=1, height=RES, width=RES, guidance_scale=0.0,
                 output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, RES, RES, 3)


def test_export_without_lora_is_exact_and_replaces_an_old_export(tiny_path, tmp_path):
    unet = tiny_unet(tiny_path)
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "stale.txt").write_text("old")
    out = export_unet(unet, tmp_path / "export", conditioning_timestep=999, num_steps=4,
                      timesteps=[999, 749, 499, 249], dtype=torch.float16)
    assert not (out / "stale.txt").exists()
    assert json.loads((out / "dmdr_export.json").read_text())["timesteps"] == [999, 749, 499, 249]
    saved = load_file(out / "diffusion_pytorch_model.safetensors")
    ref = unet.state_dict()
    assert saved.keys() == ref.keys()
    assert all(v.dtype == torch.float16 and torch.equal(v, ref[k].half()) for k, v in saved.items())
    loaded = UNet2DConditionModel.from_pretrained(out, torch_dtype=torch.float16)
    assert loaded.dtype == torch.float16


def test_an_export_has_the_modes_of_any_file_the_user_writes(tiny_path, tmp_path):
    """Exports were 0700 folders of 0600 files (mkdtemp, safetensors): unreadable for a shared ComfyUI."""
    old = os.umask(0o022)
    try:
        out = export_unet(tiny_unet(tiny_path), tmp_path / "export", conditioning_timestep=399, num_steps=1)
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in [out, *out.iterdir()]}
    assert modes == {"export": 0o755, "config.json": 0o644, "diffusion_pytorch_model.safetensors": 0o644,
                     "dmdr_export.json": 0o644}


def test_lora_targets_exist_in_the_real_sdxl_unet():
    """The SDXL base 1.0 UNet architecture (config only, on the meta device: no weights)."""
    config = dict(
        sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10),
        cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    )
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
        add_guidance_lora(unet, rank=32)
    wrapped = [n for n, _ in unet.named_modules() if n.endswith(".base_layer")]
    for target in LORA_TARGET_MODULES:
        assert any(n.endswith(f".{target}.base_layer") for n in wrapped), target
    trainable = sum(p.numel() for p in unet.parameters() if p.requires_grad)
    assert 0 < trainable < 0.05 * sum(p.numel() for p in unet.parameters())


def test_guidance_and_generator_lora_are_independent(tiny_path):
    teacher = tiny_unet(tiny_path)
    guidance, generator = copy.deepcopy(teacher), copy.deepcopy(teacher)
    add_guidance_lora(guidance, rank=2)
    add_generator_lora(generator, rank=4, alpha=8)
    assert guidance.peft_config["default"].r == 2 and generator.peft_config["default"].r == 4
    assert not has_lora(teacher)


class _Wrapper(torch.nn.Module):
    """Stands in for DDP/DeepSpeed (model under `.module`) or torch.compile (under `._orig_mod`)."""

    def __init__(self, module, attr="module"):
        super().__init__()
        setattr(self, attr, module)
        self.inner = module

    def forward(self, *args, **kwargs):
        return self.inner(*args, **kwargs)


def test_wrapped_models_and_low_precision(tiny_path, tmp_path):
    generator = tiny_unet(tiny_path)
    add_generator_lora(generator, rank=4, alpha=8)
    randomize_lora_b(generator)
    wrapped = _Wrapper(_Wrapper(generator, "_orig_mod"))
    save_lora(wrapped, tmp_path / "lora")
    assert has_lora(wrapped)
    out = export_unet(wrapped, tmp_path / "export", conditioning_timestep=399, num_steps=1)
    assert torch.allclose(eps_of(UNet2DConditionModel.from_pretrained(out)), eps_of(generator), rtol=1e-4, atol=1e-4)

    bf16 = tiny_unet(tiny_path).to(torch.bfloat16)
    x, t, embeds, pooled = unet_inputs()
    eps = predict_eps(_Wrapper(bf16), x, t, embeds, pooled, RES, lora_scale=None)
    assert eps.dtype == torch.float32 and torch.isfinite(eps).all()
