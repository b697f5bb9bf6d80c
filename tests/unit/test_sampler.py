"""Forward process, x0 recovery and the few-step sampler (dmdr.dmd.sampler)."""
import pytest
import torch

from dmdr.dmd.sampler import (
    add_noise,
    backward_simulation,
    generator_input,
    pick_x0,
    scaled_linear_alphas_cumprod,
    x0_from_eps,
)
from dmdr.dmd.timesteps import generator_timesteps

AC = scaled_linear_alphas_cumprod()
SHAPE = (4, 3, 8, 8)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def oracle(x0_true: torch.Tensor):
    """Exact epsilon for data that is the single point ``x0_true`` (per sample)."""
    def denoise(x_t, t):
        a = AC[t].reshape(-1, 1, 1, 1)
        return (x_t - a.sqrt() * x0_true) / (1 - a).sqrt()
    return denoise


def test_matches_diffusers_ddpm_scheduler():
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"
    )
    assert torch.allclose(sched.alphas_cumprod, AC)
    x0, noise = torch.randn(SHAPE, generator=gen(1)), torch.randn(SHAPE, generator=gen(2))
    t = torch.tensor([0, 399, 750, 999])
    assert torch.allclose(add_noise(x0, noise, t, AC), sched.add_noise(x0, noise, t), atol=1e-6)


def test_x0_from_eps_inverts_add_noise():
    x0, noise = torch.randn(SHAPE, generator=gen(1)), torch.randn(SHAPE, generator=gen(2))
    t = torch.tensor([0, 250, 500, 999])
    x_t = add_noise(x0, noise, t, AC)
    assert torch.allclose(x0_from_eps(x_t, noise, t, AC), x0, atol=1e-4)


def test_scalar_timestep_broadcasts_and_batch_mismatch_fails():
    x0, noise = torch.randn(SHAPE), torch.randn(SHAPE)
    assert torch.equal(add_noise(x0, noise, torch.tensor(500), AC),
                       add_noise(x0, noise, torch.full((4,), 500), AC))
    with pytest.raises(ValueError, match="3 timesteps for a batch of 4"):
        add_noise(x0, noise, torch.tensor([1, 2, 3]), AC)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_keeps_dtype_and_computes_in_float32(dtype):
    x0, noise = torch.randn(SHAPE), torch.randn(SHAPE)
    t = torch.tensor([10, 300, 700, 990])
    noisy = add_noise(x0.to(dtype), noise.to(dtype), t, AC)
    assert noisy.dtype == dtype
    ref = add_noise(x0.to(dtype).float(), noise.to(dtype).float(), t, AC)
    assert torch.allclose(noisy.float(), ref, atol=2e-2)
    x0_hat = x0_from_eps(noisy, noise.to(dtype), t, AC)
    assert x0_hat.dtype == dtype
    assert torch.allclose(x0_hat.float(), x0_from_eps(noisy.float(), noise.to(dtype).float(), t, AC),
                          rtol=2e-2, atol=2e-2)


def test_backward_simulation_walks_the_grid():
    grid = generator_timesteps(4)
    noise = torch.randn(SHAPE, generator=gen(1))
    target = torch.randn(SHAPE, generator=gen(2))
    seen = []

    def denoise(x_t, t):
        seen.append((x_t.clone(), t.clone()))
        return oracle(target)(x_t, t)

    all_x0, steps = backward_simulation(denoise, noise, grid, AC, generator=gen(3))
    assert steps.tolist() == [999, 749, 500, 250]
    assert [t.tolist() for _, t in seen] == [[v] * 4 for v in (999, 749, 500, 250)]
    assert torch.equal(seen[0][0], noise)
    for x0 in all_x0:  # the oracle recovers the point exactly at every step
        assert torch.allclose(x0, target, atol=1e-3)
    # Step i > 0 sees x0 of step i-1 re-noised to t_i with the generator's next noise draw.
    g = gen(3)
    for i in (1, 2, 3):
        expected = add_noise(all_x0[i - 1], torch.randn(SHAPE, generator=g), steps[i], AC)
        assert torch.allclose(seen[i][0], expected, atol=1e-6)


def test_backward_simulation_has_no_grad_and_one_step_is_one_call():
    weight = torch.nn.Parameter(torch.tensor(0.5))
    calls = []

    def denoise(x_t, t):
        calls.append(t.tolist())
        return weight * x_t

    all_x0, steps = backward_simulation(denoise, torch.randn(SHAPE), generator_timesteps(1), AC)
    assert calls == [[399] * 4] and steps.tolist() == [399]
    assert len(all_x0) == 1 and not all_x0[0].requires_grad


def test_generator_input_one_step_is_pure_noise():
    x0 = torch.randn(SHAPE)
    out = generator_input([x0], torch.tensor([399]), torch.full((4,), 399), AC, generator=gen(5))
    assert torch.equal(out, torch.randn(SHAPE, generator=gen(5)))


def test_generator_input_uses_the_x0_predicted_at_the_sampled_step():
    steps = generator_timesteps(4)[:-1]
    all_x0 = [torch.full(SHAPE, float(i + 1)) for i in range(4)]  # x0 of step i is all (i+1)
    sampled = torch.tensor([999, 749, 500, 250])
    out = generator_input(all_x0, steps, sampled, AC, generator=gen(5))
    noise = torch.randn(SHAPE, generator=gen(5))
    assert torch.equal(out[0], noise[0])  # top step: pure noise, like the start of sampling
    for i in (1, 2, 3):
        expected = add_noise(all_x0[i][i:i + 1], noise[i:i + 1], sampled[i:i + 1], AC)
        assert torch.allclose(out[i:i + 1], expected)

    # Samples at the same step share the rule; order in the batch does not matter.
    out = generator_input(all_x0, steps, torch.tensor([250, 250, 999, 749]), AC, generator=gen(5))
    assert torch.allclose(out[:2], add_noise(all_x0[3][:2], noise[:2], torch.tensor([250, 250]), AC))
    assert torch.equal(out[2], noise[2])


def test_pick_x0_takes_each_samples_step():
    steps = generator_timesteps(4)[:-1]
    all_x0 = [torch.full(SHAPE, float(i + 1)) for i in range(4)]
    picked = pick_x0(all_x0, steps, torch.tensor([250, 999, 500, 250]))
    assert picked.flatten(1)[:, 0].tolist() == [4.0, 1.0, 3.0, 4.0]
    one = torch.randn(SHAPE)
    assert pick_x0([one], torch.tensor([399]), torch.full((4,), 399)) is one


def test_generator_input_rejects_timesteps_off_the_grid():
    steps = generator_timesteps(4)[:-1]
    with pytest.raises(ValueError, match="not all in the grid"):
        generator_input([torch.zeros(SHAPE)] * 4, steps, torch.tensor([999, 700, 500, 250]), AC)
    with pytest.raises(ValueError, match="3 x0 predictions for 4 steps"):
        generator_input([torch.zeros(SHAPE)] * 3, steps, torch.tensor([999] * 4), AC)
    with pytest.raises(ValueError, match="not all in the grid"):
        pick_x0([torch.zeros(SHAPE)], torch.tensor([399]), torch.full((4,), 999))
