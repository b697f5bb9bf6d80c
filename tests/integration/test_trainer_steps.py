"""The trainer's steps on real tiny models: gradient accumulation, the timestep options.

Gradient accumulation: G micro-batches of B make the same updates as one batch of G*B. Two real
Trainers (tiny preset) start from the same weights; one inner step with the generator due runs
once on a batch of 4 (G=1) and once as two micro-batches of 2 (G=2) cut from that same batch
(same prompts, noise, timesteps and CFG scales). Both models' parameter updates must agree.
AdamW's first step is about lr * g / (|g| + eps): with the default eps, elements whose gradient
is at float-noise level (1e-9) flip sign between batchings, so the test uses eps 1e-6; the
gradients themselves agree to ~1e-5 either way.
"""
from __future__ import annotations

import pytest
import torch

from dmdr.config import build_config
from dmdr.train import Trainer

pytestmark = pytest.mark.slow


def _trainer(tmp_path, accumulation: int = 1, batch: int = 2, **options) -> Trainer:
    return Trainer(build_config({
        "preset": "tiny", "output_dir": str(tmp_path), "exp_name": f"acc{accumulation}",
        "cache_dir": str(tmp_path / "cache"), "batch_size": batch, "gradient_accumulation_steps": accumulation,
        "adam_epsilon": 1e-6, **options,
    }))


def _params(t: Trainer) -> dict[str, torch.Tensor]:
    named = [("gen." + n, p) for n, p in t.gen.named_parameters() if p.requires_grad]
    named += [("gui." + n, p) for n, p in t.gui.named_parameters() if p.requires_grad]
    return {n: p.detach().clone() for n, p in named}


def _slice(batch: dict, i: int, n: int) -> dict:
    def cut(v):
        if torch.is_tensor(v) and v.ndim > 0:
            return v[i * n:(i + 1) * n]
        if isinstance(v, (list, tuple)):
            return type(v)(cut(x) for x in v) if isinstance(v, tuple) else v[i * n:(i + 1) * n]
        return v  # per-step scalars (CFG scales)

    return {k: cut(v) for k, v in batch.items()}


def _one_inner_step(t: Trainer, micro_batches: list[dict]) -> dict[str, torch.Tensor]:
    t.inner_step = t.cfg.ratio_update  # the generator update is due at this inner step
    before = _params(t)
    _, gen_logs = t.train_step(micro_batches)
    assert gen_logs is not None
    after = _params(t)
    # one optimizer step per model: one LR schedule step each, whatever the accumulation
    assert t.sched_gen.scheduler.last_epoch == 1 and t.sched_gui.scheduler.last_epoch == 1
    return {n: after[n] - before[n] for n in before}


def test_accumulated_updates_equal_the_big_batch(tmp_path):
    big = _trainer(tmp_path, 1, 4)
    prompts = [f"prompt number {i}" for i in range(4)]
    batch = big.prepare_batch(prompts)
    start = _params(big)
    want = _one_inner_step(big, [batch])

    small = _trainer(tmp_path, 2, 2)
    assert all(torch.equal(start[n], p) for n, p in _params(small).items())  # same initial weights
    got = _one_inner_step(small, [_slice(batch, 0, 2), _slice(batch, 1, 2)])

    for model in ("gen.", "gui."):
        keys = [n for n in want if n.startswith(model)]
        w = torch.cat([want[n].flatten() for n in keys])
        g = torch.cat([got[n].flatten() for n in keys])
        assert w.norm() > 0
        rel = ((g - w).norm() / w.norm()).item()
        assert rel < 1e-4, f"{model[:-1]} update differs by {rel:.2e} (relative) with accumulation"


def test_guidance_fit_and_dmd_timesteps_have_their_own_beta(tmp_path):
    """--gui-fit-a/b shape the guidance-update timesteps, --gui-a/b the DMD-loss ones (the reference
    fixes Beta(4, 1.5) for the former); here pushed to opposite ends of [0, 999]."""
    t = _trainer(tmp_path, sample_num_steps=2, s_type_gui="logit_normal",
                 gui_fit_a=60.0, gui_fit_b=1.0, gui_a=1.0, gui_b=60.0)
    batch = t.prepare_batch([f"p{i}" for i in range(16)])
    assert batch["t_fit"].min() > 900 and batch["t_dmd"].max() < 100
