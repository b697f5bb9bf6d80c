"""`--format single-file`: one SDXL ``.safetensors`` checkpoint in the original (sgm) key layout.

The trained generator as the UNet, with the teacher's (the run's base model's) VAE and both text
encoders, so the file drops into ComfyUI's ``models/checkpoints`` (A1111: ``models/Stable-diffusion``) or
loads with diffusers' ``StableDiffusionXLPipeline.from_single_file``. A UNet-only file does not load there
(tianweiy/DMD2#20). The safetensors header carries how to sample it (timesteps, guidance 0).
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

from dmdr.errors import UserError
from dmdr.exports import base_model_name, sgm_keys
from dmdr.exports.diffusers_unet import merged_unet, shareable

HOW_TO_LOAD = (
    "ComfyUI: put the file in models/checkpoints (A1111/Forge: models/Stable-diffusion); diffusers: "
    "StableDiffusionXLPipeline.from_single_file(<file>, config=<the SDXL base: diffusers folder or hub id>). "
    "Sample it as trained: the timesteps in its metadata (dmdr.timesteps; diffusers: LCMScheduler, timesteps=...), "
    "no classifier-free guidance (diffusers guidance_scale=0, ComfyUI/A1111 CFG 1)."
)


def check_out(out: Path) -> None:
    """`--out` of a single-file export names the .safetensors file to write."""
    if out.suffix != ".safetensors" or out.is_dir():
        raise UserError(f"--out {out}: --format single-file writes one file; name it <something>.safetensors")


def _teacher_vae(source) -> torch.nn.Module:
    """The base model's KL VAE (training may have decoded with the tiny one)."""
    if source.parts.vae_kind == "full":
        return source.parts.vae
    from diffusers import AutoencoderKL

    from dmdr.models.sdxl import _load_part, resolve_pretrained

    folder = resolve_pretrained(source.cfg.pretrained_model, Path(source.cfg.cache_dir).expanduser())
    return _load_part(AutoencoderKL, folder, "vae")


def metadata(source, dtype: str) -> dict[str, str]:
    """The safetensors header: what the file is and how to sample it (strings only)."""
    cfg = source.cfg
    return {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "stable-diffusion-xl-v1-base",
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        "modelspec.title": f"{cfg.exp_name} step {source.step} (dmdr)",
        "modelspec.prediction_type": "epsilon",
        "dmdr.format": "dmdr-sdxl-single-file",
        "dmdr.version": "1",
        "dmdr.source_run": cfg.exp_name,
        "dmdr.source_step": str(source.step),
        "dmdr.base_model": base_model_name(cfg.pretrained_model),
        "dmdr.num_steps": str(len(source.timesteps)),
        "dmdr.timesteps": json.dumps(source.timesteps),
        "dmdr.conditioning_timestep": str(source.conditioning_timestep),
        "dmdr.guidance_scale": "0",
        "dmdr.dtype": dtype,
        "dmdr.parts": "unet: the trained generator (LoRA merged); vae, text encoders: the base model's",
        "dmdr.how_to_sample": HOW_TO_LOAD,
    }


def state_dict(source, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors: original key layout, floating tensors in `dtype`."""
    parts = source.parts
    full = sgm_keys.sdxl_checkpoint(
        merged_unet(source.unet, torch.float32).state_dict(), _teacher_vae(source).state_dict(),
        parts.text_encoder_one.state_dict(), parts.text_encoder_two.state_dict())
    return {k: (v.detach().to("cpu", dtype) if v.is_floating_point() else v.detach().cpu()).contiguous()
            for k, v in full.items()}


def write(source, out: Path, dtype: str) -> Path:
    """`--format single-file` of an `ExportSource`: `out` (a .safetensors path), written atomically."""
    from safetensors.torch import save_file

    from dmdr.exports import torch_dtype

    out = Path(out)
    check_out(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tensors = state_dict(source, torch_dtype(dtype))
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".part", dir=out.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata(source, dtype))
        shareable(Path(tmp))  # mkstemp makes it 0600: a shared ComfyUI/A1111 install could not read it
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out
