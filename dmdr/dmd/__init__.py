"""DMD math in pure torch: timestep grids and samplers, the few-step sampler, and the losses.

The trainer passes closures for UNet calls; nothing here imports diffusers.
"""
from dmdr.dmd.losses import cfg_combine, dmd_loss, guidance_loss, mean_flat, reward_hinge
from dmdr.dmd.sampler import (
    add_noise,
    backward_simulation,
    generator_input,
    pick_x0,
    randn_like,
    scaled_linear_alphas_cumprod,
    x0_from_eps,
)
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

__all__ = [
    "SAMPLING_TYPES",
    "add_noise",
    "backward_simulation",
    "cfg_combine",
    "cfg_scale",
    "check_sampling_type",
    "dmd_loss",
    "dynamic_beta",
    "generator_input",
    "generator_timesteps",
    "guidance_loss",
    "mean_flat",
    "pick_x0",
    "randn_like",
    "real_score_lora_scale",
    "reward_hinge",
    "sample_beta",
    "sample_continuous",
    "sample_discrete",
    "scaled_linear_alphas_cumprod",
    "shift_timesteps",
    "x0_from_eps",
]
