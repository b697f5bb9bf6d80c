"""Losses of DMD training: the fake-score (guidance) loss, the DMD loss and the reward hinge."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def mean_flat(x: Tensor) -> Tensor:
    """Mean over every dimension but the first (batch)."""
    return x.mean(dim=tuple(range(1, x.dim())))


def guidance_loss(eps_pred: Tensor, noise: Tensor) -> Tensor:
    """Fake-score loss: the batch mean of each sample's epsilon MSE (computed in float32)."""
    return mean_flat((eps_pred.float() - noise.float()) ** 2).mean()


def cfg_combine(eps_uncond: Tensor, eps_cond: Tensor, scale: float) -> Tensor:
    """Classifier-free guidance: ``uncond + scale * (cond - uncond)``."""
    return eps_uncond + scale * (eps_cond - eps_uncond)


def dmd_loss(x0: Tensor, x0_real: Tensor, x0_fake: Tensor) -> tuple[Tensor, Tensor]:
    """Distribution matching loss for the generator output ``x0``.

    ``x0_real`` / ``x0_fake`` are the real and fake scores' clean estimates of the noised ``x0``,
    computed without gradients by the caller. The per-sample normalised gradient is
    ``grad = ((x0 - x0_real) - (x0 - x0_fake)) / (mean|x0 - x0_real| + 1e-8)`` with non-finite
    entries set to 0, and the loss ``0.5 * mse(x0, x0 - grad)`` against a detached target, so its
    gradient with respect to ``x0`` is ``grad / x0.numel()``. Returns ``(loss, grad)``, both in
    float32, ``grad`` detached.
    """
    with torch.no_grad():
        x0_d = x0.detach().float()
        p_real = x0_d - x0_real.float()
        p_fake = x0_d - x0_fake.float()
        dims = tuple(range(1, x0.dim()))
        normaliser = p_real.abs().mean(dim=dims, keepdim=True) + 1e-8
        grad = torch.nan_to_num((p_real - p_fake) / normaliser, nan=0.0, posinf=0.0, neginf=0.0)
        target = x0_d - grad
    loss = 0.5 * F.mse_loss(x0.float(), target, reduction="mean")
    return loss, grad


def reward_hinge(scores: Tensor, margin: float = 0.7) -> Tensor:
    """Reward loss ``mean(relu(margin - scores))``: pushes scores up until they reach ``margin``."""
    return F.relu(margin - scores).mean()
