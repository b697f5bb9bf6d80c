"""VP (DDPM) forward process helpers and the generator's few-step sampler.

Pure torch: the caller passes ``alphas_cumprod`` (from the scheduler) and a ``denoise(x_t, t)``
closure that returns the generator's epsilon prediction, so nothing here knows about UNets.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

Denoise = Callable[[Tensor, Tensor], Tensor]


def scaled_linear_alphas_cumprod(
    num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012
) -> Tensor:
    """``alphas_cumprod`` of the scaled-linear beta schedule used by SDXL (float32, length T)."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def _alpha(alphas_cumprod: Tensor, t: Tensor, like: Tensor) -> Tensor:
    """``alphas_cumprod[t]`` in float32 on ``like``'s device, shaped ``(B, 1, ..., 1)``."""
    t = t.to(like.device).long().reshape(-1)
    if t.numel() == 1 and like.shape[0] != 1:
        t = t.expand(like.shape[0])
    if t.numel() != like.shape[0]:
        raise ValueError(f"got {t.numel()} timesteps for a batch of {like.shape[0]}")
    a = alphas_cumprod.to(like.device, torch.float32)[t]
    return a.reshape(-1, *([1] * (like.dim() - 1)))


def x0_from_eps(x_t: Tensor, eps: Tensor, t: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """Clean-sample estimate ``(x_t - sqrt(1-a_t) * eps) / sqrt(a_t)``, computed in float32 and
    returned in ``x_t.dtype``."""
    a = _alpha(alphas_cumprod, t, x_t)
    x0 = (x_t.float() - (1.0 - a).sqrt() * eps.float()) / a.sqrt()
    return x0.to(x_t.dtype)


def add_noise(x0: Tensor, noise: Tensor, t: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """Forward process ``sqrt(a_t) * x0 + sqrt(1-a_t) * noise`` (diffusers' DDPM ``add_noise``),
    computed in float32 and returned in ``x0.dtype``."""
    a = _alpha(alphas_cumprod, t, x0)
    return (a.sqrt() * x0.float() + (1.0 - a).sqrt() * noise.float()).to(x0.dtype)


def randn_like(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Standard normal noise shaped like ``x``; drawn on the generator's device when one is given."""
    if generator is None:
        return torch.randn_like(x)
    return torch.randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype).to(x.device)


@torch.no_grad()
def backward_simulation(
    denoise: Denoise,
    noise: Tensor,
    timesteps: Tensor,
    alphas_cumprod: Tensor,
    generator: torch.Generator | None = None,
) -> tuple[list[Tensor], Tensor]:
    """Run the generator's few-step sampler without gradients.

    ``timesteps`` is the ``N + 1`` grid of :func:`~dmdr.dmd.timesteps.generator_timesteps`.
    Starting from ``x = noise``, each step ``(t_cur, t_next)`` predicts ``x0`` from ``x`` at
    ``t_cur`` and re-noises it to ``t_next`` with fresh noise (the final re-noise to 0 is skipped:
    its result is never used). Returns the ``N`` predicted ``x0`` (the last one is the sample) and
    the ``N`` step timesteps ``timesteps[:-1]``.
    """
    timesteps = timesteps.long()
    batch = noise.shape[0]
    x = noise
    all_x0: list[Tensor] = []
    for i in range(timesteps.numel() - 1):
        t_cur = timesteps[i].to(noise.device).expand(batch)
        x0 = x0_from_eps(x, denoise(x, t_cur), t_cur, alphas_cumprod)
        all_x0.append(x0)
        if i < timesteps.numel() - 2:
            x = add_noise(x0, randn_like(x0, generator), timesteps[i + 1], alphas_cumprod)
    return all_x0, timesteps[:-1]


def _step_index(step_timesteps: Tensor, sampled_t: Tensor) -> Tensor:
    """Position of each ``sampled_t`` in ``step_timesteps`` (ValueError if one is off the grid)."""
    match = sampled_t.long()[:, None] == step_timesteps.long().to(sampled_t.device)[None, :]
    if not bool(match.any(dim=1).all()):
        raise ValueError(
            f"sampled timesteps {sampled_t.tolist()} are not all in the grid {step_timesteps.tolist()}"
        )
    return match.long().argmax(dim=1)


def pick_x0(all_x0: list[Tensor], step_timesteps: Tensor, sampled_t: Tensor) -> Tensor:
    """Each sample's ``x0`` as predicted at its sampled step: ``all_x0[i][b]`` where
    ``sampled_t[b] == step_timesteps[i]``. This is the clean sample the fake score trains on."""
    if len(all_x0) != step_timesteps.numel():
        raise ValueError(f"got {len(all_x0)} x0 predictions for {step_timesteps.numel()} steps")
    like = all_x0[0]
    index = _step_index(step_timesteps, sampled_t).to(like.device)
    if len(all_x0) == 1:
        return like
    return torch.stack(all_x0)[index, torch.arange(like.shape[0], device=like.device)]


def generator_input(
    all_x0: list[Tensor],
    step_timesteps: Tensor,
    sampled_t: Tensor,
    alphas_cumprod: Tensor,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The generator's training input at the sampled step of each sample.

    A sample whose ``sampled_t`` is step ``i`` of the grid (``step_timesteps[i]``) gets
    ``all_x0[i]`` (:func:`pick_x0`) re-noised to ``t_i`` with fresh noise. ``all_x0[i]`` is what
    the generator itself predicted at ``t_i`` during :func:`backward_simulation`, so the input
    holds content the generator actually produces at that point of its own sampling chain, at
    exactly the noise level it will see there; the generator is thus trained on its own
    trajectory, with no real data, which is what distribution matching needs. (This is the DMDR
    reference's choice; DMD2 re-noises the previous step's ``x0`` instead. Both are inputs at
    ``t_i`` from the generator's own chain.) The top step (``step_timesteps[0]``) starts sampling
    from pure noise, so samples there get pure Gaussian noise; with one step that is every sample.
    """
    picked = pick_x0(all_x0, step_timesteps, sampled_t)
    noise = randn_like(picked, generator)
    if len(all_x0) == 1:
        return noise
    noisy = add_noise(picked, noise, sampled_t, alphas_cumprod)
    top = _step_index(step_timesteps, sampled_t).to(picked.device) == 0
    return torch.where(top.reshape(-1, *([1] * (picked.dim() - 1))), noise, noisy)
