"""Guards the real-score trick: the teacher is the guidance UNet called at LoRA scale 0.

DMDR computes the real score with the guidance UNet at `cross_attention_kwargs={"scale": 0}`
and the fake score at the fake LoRA scale, relying on diffusers + peft to (a) reproduce the
base UNet exactly at scale 0, (b) honour other scales, and (c) not keep the scale after the
call. A library upgrade that breaks any of these would silently corrupt training; these tests
fail instead.
"""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import UNet2DConditionModel
from helpers_models import RES, randomize_lora_b, single_thread, tiny_path, unet_inputs  # noqa: F401  (fixtures)

from dmdr.models import LORA_TARGET_MODULES, add_guidance_lora, predict_eps


@pytest.fixture(scope="module")
def unets(tiny_path):
    """(base UNet without LoRA, the same UNet with a guidance LoRA whose B weights are random)."""
    base = UNet2DConditionModel.from_pretrained(tiny_path, subfolder="unet").eval().requires_grad_(False)
    guided = copy.deepcopy(base)
    add_guidance_lora(guided, rank=4)
    randomize_lora_b(guided)
    return base, guided


def _eps(unet, scale=None):
    x, t, embeds, pooled = unet_inputs()
    with torch.no_grad():
        return predict_eps(unet, x, t, embeds, pooled, RES, lora_scale=scale)


def test_guidance_lora_targets_and_trainable_params(unets):
    _, guided = unets
    wrapped = {name.rsplit(".base_layer", 1)[0] for name, _ in guided.named_modules() if name.endswith(".base_layer")}
    for target in LORA_TARGET_MODULES:
        assert any(name.endswith("." + target) for name in wrapped), f"no module matched {target}"
    config = guided.peft_config["default"]
    assert (config.r, config.lora_alpha, config.init_lora_weights) == (4, 4, "gaussian")
    trainable = [n for n, p in guided.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)


def test_fresh_gaussian_lora_is_a_no_op(tiny_path):
    base = UNet2DConditionModel.from_pretrained(tiny_path, subfolder="unet").eval()
    fresh = copy.deepcopy(base)
    add_guidance_lora(fresh, rank=4)  # B starts at zero
    assert torch.equal(_eps(fresh), _eps(base))


def test_scale_zero_is_exactly_the_base_unet(unets):
    base, guided = unets
    at_zero = _eps(guided, 0.0)
    assert torch.equal(at_zero, _eps(base))
    guided.disable_adapters()
    try:
        assert torch.equal(at_zero, _eps(guided))
    finally:
        guided.enable_adapters()


def test_scales_one_and_two_differ(unets):
    base, guided = unets
    base_out, one, two = _eps(base), _eps(guided, 1.0), _eps(guided, 2.0)
    assert not torch.allclose(one, base_out, atol=1e-4)
    assert not torch.allclose(two, base_out, atol=1e-4)
    assert not torch.allclose(one, two, atol=1e-4)


@pytest.mark.parametrize("scale", [0.0, 0.5, 2.0, 0.3])
def test_scale_does_not_persist_after_the_call(unets, scale):
    _, guided = unets
    at_one = _eps(guided, 1.0)
    _eps(guided, scale)
    assert torch.equal(_eps(guided), at_one)
    assert torch.equal(_eps(guided, 1.0), at_one)
