"""Fake-score loss, CFG, DMD loss and reward hinge (dmdr.dmd.losses)."""
import pytest
import torch
import torch.nn.functional as F

from dmdr.dmd.losses import cfg_combine, dmd_loss, guidance_loss, mean_flat, reward_hinge

SHAPE = (3, 4, 5, 5)


def rand(seed: int, shape=SHAPE) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def test_mean_flat_and_guidance_loss():
    x = torch.arange(12.0).reshape(2, 2, 3)
    assert torch.equal(mean_flat(x), torch.tensor([2.5, 8.5]))
    pred, noise = rand(1), rand(2)
    per_sample = ((pred - noise) ** 2).flatten(1).mean(1)
    assert torch.allclose(guidance_loss(pred, noise), per_sample.mean())
    assert torch.allclose(guidance_loss(pred, noise), F.mse_loss(pred, noise))
    assert guidance_loss(pred.half(), noise.half()).dtype == torch.float32


def test_cfg_combine():
    uncond, cond = rand(1), rand(2)
    assert torch.allclose(cfg_combine(uncond, cond, 1.0), cond)
    assert torch.equal(cfg_combine(uncond, cond, 0.0), uncond)
    assert torch.allclose(cfg_combine(uncond, cond, 7.0), uncond + 7.0 * (cond - uncond))


def test_dmd_loss_gradient_is_grad_over_numel():
    x0 = rand(1).requires_grad_()
    x0_real, x0_fake = rand(2), rand(3)
    loss, grad = dmd_loss(x0, x0_real, x0_fake)
    p_real, p_fake = x0.detach() - x0_real, x0.detach() - x0_fake
    expected = (p_real - p_fake) / (p_real.abs().mean(dim=(1, 2, 3), keepdim=True) + 1e-8)
    assert torch.allclose(grad, expected)
    assert not grad.requires_grad
    assert loss.item() == pytest.approx(0.5 * grad.pow(2).mean().item(), rel=1e-5)
    loss.backward()
    assert torch.allclose(x0.grad, grad / x0.numel(), atol=1e-10)


def test_dmd_loss_zero_when_scores_agree():
    x0 = rand(1).requires_grad_()
    loss, grad = dmd_loss(x0, rand(2), rand(2))
    assert loss.item() == 0.0 and torch.count_nonzero(grad) == 0


def test_dmd_loss_zeroes_non_finite_gradients():
    x0 = rand(1).requires_grad_()
    x0_real, x0_fake = rand(2), rand(3)
    x0_fake[0, 0, 0, 0] = float("nan")   # one bad entry: only it is zeroed
    x0_fake[1, 0, 0, 0] = float("-inf")  # p_fake = +inf -> grad -inf -> 0
    x0_real[2, 0, 0, 0] = float("inf")   # normaliser inf: the whole sample gives 0 (or nan -> 0)
    loss, grad = dmd_loss(x0, x0_real, x0_fake)
    assert torch.isfinite(grad).all() and torch.isfinite(loss)
    assert grad[0, 0, 0, 0] == 0 and grad[1, 0, 0, 0] == 0
    assert torch.count_nonzero(grad[0]) == grad[0].numel() - 1
    assert torch.count_nonzero(grad[2]) == 0
    loss.backward()
    assert torch.isfinite(x0.grad).all()


def test_dmd_loss_half_precision_input():
    x0 = rand(1).half().requires_grad_()
    loss, grad = dmd_loss(x0, rand(2).half(), rand(3).half())
    assert loss.dtype == torch.float32 and grad.dtype == torch.float32
    loss.backward()
    assert x0.grad.dtype == torch.float16 and torch.isfinite(x0.grad).all()


def test_reward_hinge():
    scores = torch.tensor([0.5, 0.9], requires_grad=True)
    loss = reward_hinge(scores)
    assert loss.item() == pytest.approx(0.1)
    loss.backward()
    assert scores.grad.tolist() == [-0.5, 0.0]  # only scores under the margin are pushed up
    assert reward_hinge(torch.tensor([0.2]), margin=1.0).item() == pytest.approx(0.8)
