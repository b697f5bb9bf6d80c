"""Distribution matching on a 2-D toy, with this project's DMD math end to end.

Target: a ring of 8 Gaussians under the SDXL VP forward process (scaled-linear betas,
0.00085..0.012, T = 1000). The real score is analytic: the noised mixture is again a mixture, so
its epsilon prediction is exact. The fake score is a small MLP trained with ``guidance_loss`` on
noised generator samples every inner step; the one-step generator ``z -> x`` is updated with
``dmd_loss`` every ``RATIO`` inner steps (two time-scale rule). The generator must move from a
blob at the origin to the ring, covering every mode.
"""
import math

import pytest
import torch
from torch import nn

from dmdr.dmd import (
    add_noise,
    dmd_loss,
    guidance_loss,
    sample_continuous,
    scaled_linear_alphas_cumprod,
    x0_from_eps,
)

MODES, RADIUS, STD = 8, 2.0, 0.15
ANGLES = torch.arange(MODES) * 2 * math.pi / MODES
MEANS = RADIUS * torch.stack([ANGLES.cos(), ANGLES.sin()], dim=1)
AC = scaled_linear_alphas_cumprod()
STEPS, RATIO, BATCH, LR = 2000, 5, 256, 1e-3


def sample_target(n: int, g: torch.Generator) -> torch.Tensor:
    k = torch.randint(0, MODES, (n,), generator=g)
    return MEANS[k] + STD * torch.randn(n, 2, generator=g)


def real_eps(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Exact epsilon of the noised mixture: eps = -sqrt(1 - a) * score(x_t)."""
    a = AC[t].unsqueeze(1)
    var = a * STD**2 + (1 - a)  # each component becomes N(sqrt(a) mu_k, var I)
    diff = x_t[:, None, :] - a.sqrt()[:, None, :] * MEANS[None]
    weights = torch.softmax(-(diff**2).sum(-1) / (2 * var), dim=1)
    score = -(weights[..., None] * diff).sum(1) / var
    return -(1 - a).sqrt() * score


class MLP(nn.Module):
    """2-D MLP; with ``timestep=True`` it also takes t as Fourier features (the fake score)."""

    def __init__(self, timestep: bool = False, hidden: int = 128):
        super().__init__()
        self.freqs = torch.arange(1, 9).float() * math.pi if timestep else None
        extra = 16 if timestep else 0
        self.net = nn.Sequential(
            nn.Linear(2 + extra, hidden), nn.SiLU(),
            nn.Linear(hidden, hidden), nn.SiLU(),
            nn.Linear(hidden, hidden), nn.SiLU(),
            nn.Linear(hidden, 2),
        )

    def forward(self, x: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        if self.freqs is not None:
            phase = (t.float() / 1000)[:, None] * self.freqs
            x = torch.cat([x, phase.sin(), phase.cos()], dim=1)
        return self.net(x)


def sliced_wasserstein(x: torch.Tensor, y: torch.Tensor, projections: int = 128) -> float:
    """Mean 1-D Wasserstein-1 distance over random directions (equal sample counts)."""
    dirs = torch.randn(2, projections, generator=torch.Generator().manual_seed(1))
    dirs = dirs / dirs.norm(dim=0)
    px, _ = (x @ dirs).sort(dim=0)
    py, _ = (y @ dirs).sort(dim=0)
    return (px - py).abs().mean().item()


def mode_shares(x: torch.Tensor) -> torch.Tensor:
    """Fraction of samples within 4 std of each mode."""
    dist = torch.cdist(x, MEANS)
    near = dist.min(dim=1).values < 4 * STD
    return torch.bincount(dist.argmin(dim=1)[near], minlength=MODES).float() / x.shape[0]


def train(generator: MLP, fake: MLP, g: torch.Generator) -> None:
    opt_gen = torch.optim.Adam(generator.parameters(), lr=LR, betas=(0.0, 0.99))
    opt_fake = torch.optim.Adam(fake.parameters(), lr=LR, betas=(0.0, 0.99))
    for step in range(STEPS):
        z = torch.randn(BATCH, 2, generator=g)
        # Fake score: denoising loss on noised generator samples, every inner step.
        with torch.no_grad():
            x = generator(z)
        t = sample_continuous(BATCH, "uniform", 1.0, 1.0, step, 0, g)
        noise = torch.randn(BATCH, 2, generator=g)
        loss_fake = guidance_loss(fake(add_noise(x, noise, t, AC), t), noise)
        opt_fake.zero_grad()
        loss_fake.backward()
        opt_fake.step()
        if step % RATIO:
            continue
        # Generator: DMD loss, real minus fake score at a random noise level.
        x = generator(z)
        t = sample_continuous(BATCH, "uniform", 1.0, 1.0, step, 0, g)
        with torch.no_grad():
            x_t = add_noise(x.detach(), torch.randn(BATCH, 2, generator=g), t, AC)
            x0_real = x0_from_eps(x_t, real_eps(x_t, t), t, AC)
            x0_fake = x0_from_eps(x_t, fake(x_t, t), t, AC)
        loss_gen, _ = dmd_loss(x, x0_real, x0_fake)
        opt_gen.zero_grad()
        loss_gen.backward()
        opt_gen.step()


@pytest.mark.slow
def test_dmd_matches_a_gaussian_mixture():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        generator, fake = MLP(), MLP(timestep=True)
        evaluation = torch.Generator().manual_seed(123)
        target = sample_target(4000, evaluation)
        z_eval = torch.randn(4000, 2, generator=evaluation)
        with torch.no_grad():
            before = sliced_wasserstein(generator(z_eval), target)
        train(generator, fake, torch.Generator().manual_seed(0))
        with torch.no_grad():
            samples = generator(z_eval)
    finally:
        torch.set_num_threads(threads)
    after = sliced_wasserstein(samples, target)
    shares = mode_shares(samples)
    assert after < 0.3 * before, f"sliced Wasserstein {before:.3f} -> {after:.3f}"
    assert (shares > 0.03).all(), f"modes dropped: shares {shares.tolist()}"
    # A continuous map of a Gaussian cannot split into 8 islands, so some mass stays between modes.
    assert shares.sum() > 0.45, f"only {shares.sum():.2f} of samples near a mode"
