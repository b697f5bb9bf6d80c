"""Timestep grids, shift, samplers and schedules (dmdr.dmd.timesteps)."""
import math

import pytest
import torch

from dmdr.dmd.timesteps import (
    SAMPLING_TYPES,
    cfg_scale,
    check_sampling_type,
    dynamic_beta,
    generator_timesteps,
    real_score_lora_scale,
    sample_beta,
    sample_continuous,
    sample_discrete,
    shift_timesteps,
)

GRID4 = torch.tensor([999, 749, 500, 250])  # step timesteps of the 4-step grid


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- grids and shift -------------------------------------------------------------------------

def test_four_step_grid_rounds_half_to_even():
    # linspace gives 999, 749.25, 499.5, 249.75, 0; torch.round: 749, 500 (half to even), 250.
    grid = generator_timesteps(4)
    assert grid.dtype == torch.long
    assert grid.tolist() == [999, 749, 500, 250, 0]
    assert generator_timesteps(2).tolist() == [999, 500, 0]


def test_one_step_grid_uses_conditioning_timestep():
    assert generator_timesteps(1).tolist() == [399, 0]
    assert generator_timesteps(1, conditioning_timestep=500).tolist() == [500, 0]
    assert generator_timesteps(1, shift=3.0).tolist() == [399, 0]


def test_explicit_step_timesteps_give_dmd2_grid():
    """DMD2's 4-step SDXL steps 999, 749, 499, 249, which the rounded linspace cannot give."""
    assert generator_timesteps(4, steps=[999, 749, 499, 249]).tolist() == [999, 749, 499, 249, 0]
    assert generator_timesteps(1, steps=[500]).tolist() == [500, 0]
    for bad in ([999, 749, 499], [999, 749, 749, 249], [1000, 749, 499, 249]):
        with pytest.raises(ValueError, match="descending"):
            generator_timesteps(4, steps=bad)


def test_grid_rejects_bad_arguments():
    with pytest.raises(ValueError, match="at least one"):
        generator_timesteps(0)
    with pytest.raises(ValueError, match="conditioning timestep"):
        generator_timesteps(1, conditioning_timestep=1000)
    with pytest.raises(ValueError, match="shift"):
        generator_timesteps(4, shift=0.0)


def test_shift_one_is_exact_identity():
    t = torch.arange(1000)
    assert torch.equal(shift_timesteps(t, 1.0), t.double())


def test_shift_fix_applies_to_normalised_timesteps():
    """Reference defect: shift*t/(1+(shift-1)*t) on raw t collapses every step to ~1."""
    raw = torch.linspace(999, 0, 5, dtype=torch.float64)
    reference = 3.0 * raw / (1 + 2.0 * raw)
    assert (reference[:-1] < 1.5).all()  # the defect: 999, 749, 500, 250 all become ~1.5

    grid = generator_timesteps(4, shift=3.0)
    # u = 0.75 -> 0.9 -> 899.1; u = 0.5 -> 0.75 -> 749.25; u = 0.25 -> 0.5 -> 499.5 -> 500.
    assert grid.tolist() == [999, 899, 749, 500, 0]
    shifted = shift_timesteps(raw, 3.0)
    assert shifted[0].item() == pytest.approx(999.0) and shifted[-1].item() == 0.0
    assert (shifted[1:-1] > raw[1:-1]).all()  # shift > 1 moves steps towards noise
    assert (shift_timesteps(raw, 1 / 3)[1:-1] < raw[1:-1]).all()


# --- schedules -------------------------------------------------------------------------------

def test_dynamic_beta_cosine_decay():
    assert dynamic_beta(4.0, 1.5, 0, 100) == pytest.approx((4.0, 1.5))
    assert dynamic_beta(4.0, 1.5, 50, 100) == pytest.approx((2.5, 1.25))
    assert dynamic_beta(4.0, 1.5, 100, 100) == pytest.approx((1.0, 1.0))
    assert dynamic_beta(4.0, 1.5, 500, 100) == pytest.approx((1.0, 1.0))
    assert dynamic_beta(4.0, 1.5, 50, 0) == (4.0, 1.5)  # disabled


def test_real_score_lora_scale_schedule():
    assert real_score_lora_scale(0.5, 0, 100) == pytest.approx(0.5)
    assert real_score_lora_scale(0.5, 50, 100) == pytest.approx(0.25)
    assert real_score_lora_scale(0.5, 25, 100) == pytest.approx(0.25 * (1 + math.cos(math.pi / 4)))
    assert real_score_lora_scale(0.5, 100, 100) == 0.0
    assert real_score_lora_scale(0.5, 0, 0) == 0.0  # no dynamic steps: pure teacher from step 0


def test_cfg_scale_range_and_no_guidance():
    assert cfg_scale(1.0) == 1.0
    assert cfg_scale(0.5) == 1.0
    draws = [cfg_scale(7.0, gen(s)) for s in range(200)]
    assert all(6.5 <= d <= 7.5 for d in draws)
    assert min(draws) < 6.6 and max(draws) > 7.4
    assert cfg_scale(7.0, gen(3)) == cfg_scale(7.0, gen(3))


# --- sampling types --------------------------------------------------------------------------

def test_unknown_sampling_type_is_rejected():
    """Reference defect: its default type 'normal' is not an accepted choice."""
    assert SAMPLING_TYPES == ("uniform", "logit_normal")
    assert check_sampling_type("uniform") == "uniform"
    for call in (
        lambda: check_sampling_type("normal"),
        lambda: sample_discrete(4, GRID4, "normal", 1.0, 1.0, 0, 0),
        lambda: sample_continuous(4, "normal", 1.0, 1.0, 0, 0),
    ):
        with pytest.raises(ValueError, match="'normal'.*uniform, logit_normal"):
            call()


# --- Beta draws ------------------------------------------------------------------------------

@pytest.mark.parametrize("a,b", [(4.0, 1.5), (1.0, 1.0), (0.5, 0.3)])
def test_beta_draws_match_the_distribution(a, b):
    u = sample_beta(a, b, 40_000, gen(1))
    assert ((u >= 0) & (u <= 1)).all()
    mean, var = a / (a + b), a * b / ((a + b) ** 2 * (a + b + 1))
    assert u.mean().item() == pytest.approx(mean, abs=0.01)
    assert u.var().item() == pytest.approx(var, rel=0.05)
    # Two-sample Kolmogorov-Smirnov distance against torch's own Beta sampler.
    ref = torch.distributions.Beta(a, b).sample((40_000,)).double()
    grid = torch.linspace(0, 1, 201, dtype=torch.float64)
    cdf = lambda s: (s[None, :] <= grid[:, None]).double().mean(1)  # noqa: E731
    assert (cdf(u) - cdf(ref)).abs().max().item() < 0.02


# --- discrete sampling -----------------------------------------------------------------------

def test_discrete_uniform_covers_the_grid():
    t = sample_discrete(4000, GRID4, "uniform", 1.0, 1.0, 0, 0, gen())
    counts = torch.stack([(t == v).sum() for v in GRID4])
    assert counts.sum() == 4000 and (counts > 850).all()


def test_discrete_logit_normal_compares_normalised_timesteps():
    """Reference defect: u in [0, 1] compared with integer timesteps always picked the smallest."""
    u = sample_beta(200.0, 200.0, 64, gen())
    reference_pick = GRID4[(GRID4[None, :].double() - u[:, None]).abs().argmin(1)]
    assert (reference_pick == 250).all()  # the defect

    centred = sample_discrete(64, GRID4, "logit_normal", 200.0, 200.0, 0, 0, gen())
    assert (centred == 500).all()  # u ~ 0.5 -> 500/999
    skewed = sample_discrete(400, GRID4, "logit_normal", 20.0, 1.0, 0, 0, gen())
    assert set(skewed.tolist()) <= {999, 749}
    assert (skewed == 999).float().mean() > 0.5


def test_discrete_dynamic_decay_reaches_uniform():
    late = sample_discrete(4000, GRID4, "logit_normal", 20.0, 1.0, 1000, 100, gen())
    counts = torch.stack([(late == v).sum() for v in GRID4])
    assert (counts > 400).all()  # Beta(1, 1): every step gets its share of [0, 1]


# --- continuous sampling ---------------------------------------------------------------------

def test_continuous_uniform_range():
    t = sample_continuous(20_000, "uniform", 1.0, 1.0, 0, 0, gen())
    assert t.dtype == torch.long
    assert t.min() >= 1 and t.max() <= 999
    assert t.double().mean().item() == pytest.approx(500.0, abs=10)


def test_continuous_logit_normal_follows_beta():
    t = sample_continuous(20_000, "logit_normal", 4.0, 1.5, 0, 0, gen())
    assert t.min() >= 0 and t.max() <= 999
    assert t.double().mean().item() == pytest.approx(1000 * 4.0 / 5.5, abs=10)


@pytest.mark.parametrize("s_type", SAMPLING_TYPES)
def test_samplers_are_deterministic_given_a_generator(s_type):
    def draw(seed):
        g = gen(seed)
        return (
            sample_discrete(32, GRID4, s_type, 4.0, 1.5, 10, 100, g),
            sample_continuous(32, s_type, 4.0, 1.5, 10, 100, g),
        )

    d1, c1 = draw(7)
    d2, c2 = draw(7)
    assert torch.equal(d1, d2) and torch.equal(c1, c2)
    d3, c3 = draw(8)
    assert not (torch.equal(d1, d3) and torch.equal(c1, c3))
