"""Test helpers for the model tests: one tiny SDXL pipeline per test session, small inputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dmdr.models.tiny import build_tiny_sdxl

RES = 64  # pixels; the tiny VAE maps 64 px to an 8x8 latent


@pytest.fixture(autouse=True)
def single_thread():
    """Tiny models run far faster on one thread on a shared CPU; restore the setting after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny pipeline, built once per session (build_tiny_sdxl is idempotent)."""
    return build_tiny_sdxl(tmp_path_factory.getbasetemp() / "tiny-sdxl", seed=0)


def unet_inputs(batch: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random (x_t, t, prompt_embeds, pooled) shaped for the tiny UNet."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, RES // 8, RES // 8, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    embeds = torch.randn(batch, 77, 80, generator=g)
    pooled = torch.randn(batch, 32, generator=g)
    return x, t, embeds, pooled


def randomize_lora_b(unet: torch.nn.Module, seed: int = 1) -> None:
    """Give every LoRA B matrix random values, so the adapter changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if ".lora_B." in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.1)


def tiny_unet(tiny_path: Path) -> torch.nn.Module:
    """The tiny pipeline's UNet, in eval mode."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(tiny_path, subfolder="unet").eval()


def eps_of(unet: torch.nn.Module) -> torch.Tensor:
    """The UNet's noise prediction on the fixed `unet_inputs()` (no grad)."""
    from dmdr.models import predict_eps

    x, t, embeds, pooled = unet_inputs()
    with torch.no_grad():
        return predict_eps(unet, x, t, embeds, pooled, RES)
