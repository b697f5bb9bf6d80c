"""`dmdr export --format lora`: the generator LoRA in diffusers' and kohya's formats, loaded back by diffusers'
own `load_lora_weights`, and LoRAs extracted from a full fine-tune by truncated SVD."""
from __future__ import annotations

import copy
import json
import math
from types import SimpleNamespace

import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from helpers_models import eps_of, randomize_lora_b, single_thread, tiny_path, tiny_unet  # noqa: F401  (fixtures)
from peft import get_peft_model_state_dict

from dmdr.config import TrainConfig
from dmdr.errors import UserError
from dmdr.exports import ExportSource
from dmdr.exports import lora as lora_export
from dmdr.exports.diffusers_unet import merged_unet
from dmdr.models import add_generator_lora


def _source(tiny_path, unet, teacher=None, **cfg):
    config = TrainConfig(pretrained_model=str(tiny_path), **cfg)
    return ExportSource(config, tiny_path, 1, SimpleNamespace(unet=teacher), unet, [399])


def _loaded(tiny_path, folder, weight_name=None):
    """The UNet of a tiny SDXL pipeline after diffusers' own `load_lora_weights` of the export."""
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_path)
    kwargs = {"weight_name": weight_name} if weight_name else {}
    pipe.load_lora_weights(str(folder), **kwargs)
    return pipe.unet.eval()


def test_lora_run_exports_what_diffusers_loads_as_the_merged_model(tiny_path, tmp_path):
    generator = tiny_unet(tiny_path)
    add_generator_lora(generator, rank=4, alpha=8)  # dmdr's generator LoRA: alpha = 2 r, scale 2
    randomize_lora_b(generator)
    merged = eps_of(merged_unet(generator, torch.float32))
    assert not torch.allclose(merged, eps_of(tiny_unet(tiny_path)), atol=1e-3)  # the LoRA changes the output

    out = lora_export.write(_source(tiny_path, generator, use_lora_gen=True), tmp_path / "dmdr-lora", "fp32")
    info = json.loads((out / "dmdr_export.json").read_text())
    assert (info["rank"], info["lora_alpha"], info["source"], info["timesteps"]) == (4, 4, "adapter", [399])
    assert info["base_model"] == tiny_path.name  # a local base by its name: no path of the training machine
    ours = {k.replace(".default", ""): v for k, v in get_peft_model_state_dict(generator).items()}
    for name in (lora_export.DIFFUSERS_FILE, "dmdr-lora_kohya.safetensors"):
        unet = _loaded(tiny_path, out, name)
        theirs = get_peft_model_state_dict(unet, adapter_name=next(iter(unet.peft_config)))
        assert theirs.keys() == ours.keys(), name  # every module loaded, none left out or unexpected
        assert torch.allclose(eps_of(unet), merged, rtol=1e-5, atol=1e-5), name


def _fine_tune(teacher: torch.nn.Module, seed: int = 3) -> torch.nn.Module:
    """A 'full fine-tune' of the teacher: every LoRA target weight moved by random noise, and one bias."""
    gen = copy.deepcopy(teacher)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in lora_export._targets(gen).values():
            module.weight.add_(torch.randn(module.weight.shape, generator=g) * 0.05)
        gen.conv_in.bias.add_(0.5)  # conv_in is no LoRA target: no LoRA carries this
    return gen


@pytest.mark.parametrize("ode_lora", [False, True], ids=["full-fine-tune", "lora-on-ode-init"])
def test_extracted_lora_at_full_rank_reproduces_the_fine_tune(tiny_path, tmp_path, ode_lora):
    teacher = tiny_unet(tiny_path)
    gen = _fine_tune(teacher)
    gen.conv_in.bias.data.copy_(teacher.conv_in.bias)  # only the targets differ: the LoRA must be exact
    cfg = {}
    if ode_lora:  # a LoRA trained on an ODE init (here: the fine-tune): the LoRA of the merged whole
        add_generator_lora(gen, rank=4, alpha=8)
        randomize_lora_b(gen)
        cfg = {"use_lora_gen": True, "xl_ode_pretrain_path": "ode.safetensors"}
    source = _source(tiny_path, gen, teacher, **cfg)
    out = lora_export.write(source, tmp_path / "full", "fp32", extract_lora=10_000)
    info = json.loads((out / "dmdr_export.json").read_text())
    assert info["source"] == "extracted" and info["extraction"]["relative_error"] < 1e-5
    expected = eps_of(merged_unet(gen, torch.float32))
    assert not torch.allclose(expected, eps_of(teacher), atol=1e-3)
    for name in (lora_export.DIFFUSERS_FILE, "full_kohya.safetensors"):
        assert torch.allclose(eps_of(_loaded(tiny_path, out, name)), expected, rtol=1e-4, atol=1e-4), name


def test_extracted_lora_error_is_the_dropped_singular_values(tiny_path, tmp_path):
    teacher = tiny_unet(tiny_path)
    gen = _fine_tune(teacher)
    rank = 2
    out = lora_export.write(_source(tiny_path, gen, teacher), tmp_path / "low", "fp32", extract_lora=rank)
    report = json.loads((out / "dmdr_export.json").read_text())["extraction"]

    unet = _loaded(tiny_path, out)
    unet.fuse_lora()
    unet.unload_lora()
    fused = dict(unet.named_modules())
    residual, dropped = 0.0, 0.0
    with torch.no_grad():
        for name, module in lora_export._targets(gen).items():
            target = module.weight.float()
            delta = (target - dict(teacher.named_modules())[name].weight).reshape(target.shape[0], -1)
            dropped += float(torch.linalg.svdvals(delta)[rank:].square().sum())
            residual += float((fused[name].weight - target).square().sum())
    assert dropped > 0
    assert math.sqrt(residual) == pytest.approx(math.sqrt(dropped), rel=1e-3)
    assert report["dropped_norm"] == pytest.approx(math.sqrt(dropped), rel=1e-4)
    assert report["not_carried_norm"] == pytest.approx(0.5 * teacher.conv_in.bias.numel() ** 0.5, rel=1e-4)


@pytest.mark.parametrize("cfg, extract, message", [
    ({"use_lora_gen": False}, None, "add --extract-lora RANK"),
    ({"use_lora_gen": True}, 8, "drop --extract-lora"),
    ({"use_lora_gen": True, "xl_ode_pretrain_path": "ode.bin"}, None, "sits on the ODE init ode.bin"),
    ({"use_lora_gen": False}, 0, "must be a positive integer"),
])
def test_a_lora_the_run_cannot_give_is_one_clear_error(cfg, extract, message):
    with pytest.raises(UserError, match=message):
        lora_export.check(TrainConfig(**cfg), extract)
