"""Timestep grids and timestep samplers for DMD training.

Timesteps are integers in ``[0, T-1]`` with ``T = num_train_timesteps`` (1000 for SDXL).
Two kinds of sampling are used:

- *discrete*: pick one of the generator's few-step grid timesteps (generator training);
- *continuous*: any integer timestep (fake-score training and the DMD loss).

Each can be ``"uniform"`` or ``"logit_normal"``. The reference calls the latter logit-normal but
draws ``u ~ Beta(a, b)`` on ``[0, 1]``; this module keeps both the name and the Beta draw. With
``dynamic_step > 0`` the Beta parameters decay to 1 (uniform) on a cosine schedule.

Fixes over the reference (each named in tests/unit/test_timesteps.py):

- the timestep shift is applied to ``t / (T-1)``, not to the raw integer timestep;
- discrete logit-normal sampling compares ``u`` with normalised timesteps ``t / (T-1)``;
- an unknown sampling type (the reference default ``"normal"``) is an error.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

SAMPLING_TYPES = ("uniform", "logit_normal")
NUM_TRAIN_TIMESTEPS = 1000


def check_sampling_type(s_type: str) -> str:
    """Return ``s_type`` if it is one of :data:`SAMPLING_TYPES`, else raise ``ValueError``."""
    if s_type not in SAMPLING_TYPES:
        raise ValueError(
            f"unknown timestep sampling type {s_type!r}: use one of {', '.join(SAMPLING_TYPES)}"
        )
    return s_type


def shift_timesteps(t: Tensor, shift: float, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> Tensor:
    """Shift timesteps towards the noisy end (``shift > 1``) or the clean end (``shift < 1``).

    With ``u = t / (T-1)`` the shifted value is ``u' = shift*u / (1 + (shift-1)*u)``, returned on the
    timestep scale ``u' * (T-1)`` as floats. ``0`` and ``T-1`` are fixed points; ``shift == 1`` is
    the exact identity. (The reference applied the formula to raw ``t``, collapsing every step to ~1.)
    """
    if shift <= 0:
        raise ValueError(f"timestep shift must be > 0, got {shift}")
    t = t.to(torch.float64)
    # Same as u' * (T-1), written so that shift == 1 returns t bit-for-bit.
    return shift * t / (1.0 + (shift - 1.0) * t / (num_train_timesteps - 1))


def generator_timesteps(
    num_steps: int,
    shift: float = 1.0,
    conditioning_timestep: int = 399,
    num_train_timesteps: int = NUM_TRAIN_TIMESTEPS,
    steps: Sequence[int] | None = None,
) -> Tensor:
    """The generator's descending grid of ``num_steps + 1`` integer timesteps, ending at 0.

    ``steps`` gives the ``num_steps`` step timesteps explicitly (e.g. DMD2's 4-step SDXL
    ``[999, 749, 499, 249]``, which the rounded linspace below does not give); the grid is then
    ``steps + [0]``, unshifted.

    ``linspace(T-1, 0, N+1)``, shifted, rounded with ``torch.round`` (round half to even, so
    N=4 gives ``[999, 749, 500, 250, 0]``: 749.25 -> 749, 499.5 -> 500, 249.75 -> 250). For one
    step the grid is ``[conditioning_timestep, 0]``: one-step SDXL starts from pure noise but is
    conditioned on timestep 399 (the DMD2 trick its ODE-pretrained initialisation expects).
    The generator steps are ``grid[:-1]``.
    """
    if num_steps < 1:
        raise ValueError(f"the generator needs at least one sampling step, got {num_steps}")
    if steps is not None:
        steps = [int(t) for t in steps]
        if len(steps) != num_steps or not all(0 <= t < num_train_timesteps for t in steps) \
                or any(a <= b for a, b in zip(steps, steps[1:])):
            raise ValueError(f"step timesteps {steps}: need {num_steps} descending values in "
                             f"[0, {num_train_timesteps - 1}]")
        return torch.tensor(steps + [0], dtype=torch.long)
    if num_steps == 1:
        if not 0 < conditioning_timestep < num_train_timesteps:
            raise ValueError(
                f"conditioning timestep must be in [1, {num_train_timesteps - 1}], "
                f"got {conditioning_timestep}"
            )
        return torch.tensor([conditioning_timestep, 0], dtype=torch.long)
    grid = torch.linspace(num_train_timesteps - 1, 0, num_steps + 1, dtype=torch.float64)
    grid = shift_timesteps(grid, shift, num_train_timesteps)
    grid[-1] = 0.0
    return torch.round(grid).long()


def dynamic_beta(a: float, b: float, step: int, dynamic_step: int) -> tuple[float, float]:
    """Beta parameters at ``step``: cosine decay from ``(a, b)`` at step 0 to ``(1, 1)`` (uniform)
    at ``dynamic_step`` and after. ``dynamic_step <= 0`` disables the decay."""
    if dynamic_step <= 0:
        return a, b
    progress = min(step / dynamic_step, 1.0)
    c = 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 + (a - 1.0) * c, 1.0 + (b - 1.0) * c


def _device_of(generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


def _standard_gamma(shape: float, n: int, generator: torch.Generator | None) -> Tensor:
    """``n`` exact draws from Gamma(shape, 1) that honour ``generator`` (float64).

    Marsaglia-Tsang squeeze/rejection for ``shape >= 1``; for ``shape < 1`` the boost
    ``Gamma(shape) = Gamma(shape + 1) * U ** (1 / shape)``. torch's own Gamma/Beta samplers take
    no generator, so they cannot be made deterministic per stream.
    """
    if shape <= 0:
        raise ValueError(f"Beta/Gamma parameters must be > 0, got {shape}")
    device = _device_of(generator)
    kw = dict(generator=generator, device=device, dtype=torch.float64)
    boost = shape < 1.0
    d = (shape + 1.0 if boost else shape) - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    out = torch.empty(n, device=device, dtype=torch.float64)
    todo = torch.arange(n, device=device)
    while todo.numel():
        x = torch.randn(todo.numel(), **kw)
        u = torch.rand(todo.numel(), **kw)
        v = (1.0 + c * x) ** 3
        ok = v > 0
        log_v = torch.log(torch.where(ok, v, torch.ones_like(v)))
        ok &= torch.log(u) < 0.5 * x * x + d - d * v + d * log_v
        out[todo[ok]] = d * v[ok]
        todo = todo[~ok]
    if boost:
        out = out * torch.rand(n, **kw) ** (1.0 / shape)
    return out


def sample_beta(a: float, b: float, n: int, generator: torch.Generator | None = None) -> Tensor:
    """``n`` draws of ``u ~ Beta(a, b)`` (float64, on the generator's device or CPU)."""
    x = _standard_gamma(a, n, generator)
    y = _standard_gamma(b, n, generator)
    return x / (x + y)


def sample_discrete(
    batch: int,
    timesteps: Tensor,
    s_type: str,
    a: float,
    b: float,
    step: int,
    dynamic_step: int,
    generator: torch.Generator | None = None,
    num_train_timesteps: int = NUM_TRAIN_TIMESTEPS,
) -> Tensor:
    """Pick ``batch`` timesteps among ``timesteps`` (the generator's step timesteps).

    ``uniform``: a uniform index. ``logit_normal``: draw ``u ~ Beta(a', b')`` with the dynamic
    parameters of :func:`dynamic_beta` and take the timestep whose normalised value
    ``t / (T-1)`` is closest to ``u`` (ties go to the earlier entry). Returns a LongTensor on
    ``timesteps.device``.
    """
    check_sampling_type(s_type)
    timesteps = timesteps.long()
    if s_type == "uniform":
        index = torch.randint(
            0, timesteps.numel(), (batch,), generator=generator, device=_device_of(generator)
        )
    else:
        u = sample_beta(*dynamic_beta(a, b, step, dynamic_step), batch, generator)
        normalised = timesteps.to(u.device, torch.float64) / (num_train_timesteps - 1)
        index = (normalised[None, :] - u[:, None]).abs().argmin(dim=1)
    return timesteps[index.to(timesteps.device)]


def sample_continuous(
    batch: int,
    s_type: str,
    a: float,
    b: float,
    step: int,
    dynamic_step: int,
    generator: torch.Generator | None = None,
    num_train_timesteps: int = NUM_TRAIN_TIMESTEPS,
) -> Tensor:
    """``batch`` integer timesteps in ``[0, T-1]`` (on the generator's device or CPU).

    ``uniform``: ``u = rand * (1 - 0.001) + 0.001``; ``logit_normal``: ``u ~ Beta(a', b')``;
    then ``t = round(u * T)`` clamped to ``[0, T-1]``.
    """
    check_sampling_type(s_type)
    if s_type == "uniform":
        u = torch.rand(batch, generator=generator, device=_device_of(generator), dtype=torch.float64)
        u = u * (1.0 - 0.001) + 0.001
    else:
        u = sample_beta(*dynamic_beta(a, b, step, dynamic_step), batch, generator)
    return (u * num_train_timesteps).round().clamp(0, num_train_timesteps - 1).long()


def real_score_lora_scale(lora_scale_r: float, step: int, dynamic_step: int) -> float:
    """LoRA scale for the real score: ``lora_scale_r`` decaying on a cosine to 0 at
    ``dynamic_step``; 0 (the pure teacher) from then on, and always when ``dynamic_step <= 0``."""
    if step < dynamic_step:
        return lora_scale_r * 0.5 * (1.0 + math.cos(math.pi * step / dynamic_step))
    return 0.0


def cfg_scale(cfg: float, generator: torch.Generator | None = None) -> float:
    """Guidance scale for one step: uniform in ``[cfg - 0.5, cfg + 0.5]`` when ``cfg > 1``,
    else 1.0 (no guidance). Uses torch's RNG so ``generator`` makes it reproducible."""
    if cfg <= 1.0:
        return 1.0
    u = torch.rand((), generator=generator, device=_device_of(generator), dtype=torch.float64)
    return float(cfg - 0.5 + u)
