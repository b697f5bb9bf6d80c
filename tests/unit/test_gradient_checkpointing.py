"""--gradient-checkpointing must not change any gradient, at any LoRA scale, on either UNet.

diffusers undoes a `cross_attention_kwargs` LoRA scale when the forward returns, before the
checkpointed blocks are recomputed in backward; the models built for `--gradient-checkpointing`
must still give the gradients of the same models without checkpointing (relative difference
of the gradient vector below 1e-5). The real score is the same guidance UNet at another scale,
so a call at one scale must not leak into the backward of another.
"""
from __future__ import annotations

import copy

import pytest
import torch
from helpers_models import RES, randomize_lora_b, single_thread, unet_inputs  # noqa: F401  (fixture)

from dmdr import components
from dmdr.config import build_config
from dmdr.models import predict_eps

TOL = 1e-5


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(checkpointed, plain) pairs of the guidance UNet and the LoRA generator, as a run builds them."""
    base = tmp_path_factory.mktemp("ckpt")
    cfg = build_config({"preset": "tiny", "output_dir": str(base / "out"), "cache_dir": str(base / "cache"),
                        "gradient_checkpointing": True, "use_lora_gen": True})
    models = components.build_models(cfg, torch.device("cpu"))
    pairs = {}
    for name, unet in (("guidance", models.guidance), ("generator", models.generator)):
        randomize_lora_b(unet)
        assert unet.is_gradient_checkpointing
        plain = copy.deepcopy(unet)
        plain.disable_gradient_checkpointing()
        pairs[name] = (unet.train(), plain.train())
    return pairs


def _loss(unet, scale, seed=0, grad=True):
    x, t, embeds, pooled = unet_inputs(seed=seed)
    with torch.set_grad_enabled(grad):
        return predict_eps(unet, x, t, embeds, pooled, RES, lora_scale=scale).square().mean()


def _grads(unet) -> torch.Tensor:
    out = torch.cat([p.grad.flatten() for p in unet.parameters() if p.requires_grad])
    unet.zero_grad(set_to_none=True)
    return out


def _assert_close(got: torch.Tensor, want: torch.Tensor) -> None:
    rel = ((got - want).norm() / want.norm()).item()
    assert rel < TOL, f"gradient differs by {rel:.2e} (relative)"


@pytest.mark.parametrize("which", ["guidance", "generator"])
@pytest.mark.parametrize("scale", [0.5, 1.0, 2.0, None])
def test_checkpointed_gradients_match(built, which, scale):
    ckpt, plain = built[which]
    loss_c, loss_p = _loss(ckpt, scale), _loss(plain, scale)
    assert torch.equal(loss_c, loss_p)
    loss_c.backward()
    loss_p.backward()
    _assert_close(_grads(ckpt), _grads(plain))


def test_other_calls_do_not_leak_into_backward(built):
    """Fake pass with grad at 2, a no-grad real pass at 0 and a second graph at 0.5 in between,
    then one backward: the checkpointed recompute of each graph sees its own scale."""
    ckpt, plain = built["guidance"]
    grads = []
    for unet in (ckpt, plain):
        fake = _loss(unet, 2.0, seed=0)
        _loss(unet, 0.0, seed=1, grad=False)
        other = _loss(unet, 0.5, seed=2)
        (fake + other).backward()
        grads.append(_grads(unet))
    _assert_close(*grads)
    # and nothing stays behind: scale 1 after all that is scale 1 of a fresh call
    with torch.no_grad():
        assert torch.equal(_loss(ckpt, 1.0, grad=False), _loss(plain, None, grad=False))
