"""`--format diffusers`: the generator as a diffusers UNet folder (safetensors) plus dmdr_export.json."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from dmdr.models.sdxl import ADAPTER, EXPORT_INFO, has_lora, lora_config, lora_meta, unwrap

LAST = EXPORT_INFO  # a folder in the store is whole once its dmdr_export.json is there


def merged_unet(unet: torch.nn.Module, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """A CPU copy of the UNet with any LoRA merged into the base weights; the input is untouched.

    The copy is built on the meta device and takes CPU clones of the weights, so no second copy
    of the model lands on the accelerator. Merging happens in fp32; the result is cast to `dtype`
    (default: the dtype of the UNet's base weights).
    """
    from diffusers import UNet2DConditionModel

    model = unwrap(unet)
    dtype = dtype or model.conv_in.weight.dtype
    state = {k: v.detach().to("cpu", torch.float32, copy=True) for k, v in model.state_dict().items()}
    with torch.device("meta"):
        clone = UNet2DConditionModel.from_config(model.config)
    if has_lora(model):
        meta = lora_meta(model)
        clone.add_adapter(lora_config(meta["r"], meta["lora_alpha"]), adapter_name=ADAPTER)
    clone.load_state_dict(state, strict=True, assign=True)
    if has_lora(clone):
        clone.fuse_lora(safe_fusing=True)
        clone.unload_lora()
    for param in clone.parameters():  # cast tensors directly: ModelMixin.to() warns about fp32 modules
        param.data = param.data.to(dtype)
    return clone.eval().requires_grad_(False)


def shareable(path: Path) -> None:
    """Give ``path`` (a file, or a folder and everything in it) the modes of any file the user creates
    (0666/0777 less the umask): mkdtemp makes folders 0700 and safetensors writes files 0600, which a
    shared ComfyUI/A1111 install or another user of the cluster cannot read."""
    mask = os.umask(0)
    os.umask(mask)
    for item in [path, *(path.rglob("*") if path.is_dir() else ())]:
        item.chmod((0o777 if item.is_dir() else 0o666) & ~mask)


def replace_dir(built: Path, dest: Path) -> None:
    """Move a finished folder into place (modes as `shareable` makes them), replacing an older one at `dest`."""
    shareable(built)
    if dest.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
        os.replace(dest, trash / "old")
        shutil.rmtree(trash, ignore_errors=True)
    os.replace(built, dest)


def export_unet(
    unet: torch.nn.Module,
    out_dir: str | Path,
    *,
    conditioning_timestep: int,
    num_steps: int,
    timesteps: Sequence[int] | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Export the generator as a diffusers UNet folder (safetensors) plus dmdr_export.json.

    A LoRA generator is merged on a copy. The folder loads with
    `UNet2DConditionModel.from_pretrained` and plugs into
    `StableDiffusionXLPipeline.from_pretrained(base, unet=...)`. `timesteps` are the sampling
    timesteps (default `[conditioning_timestep]` for one step); `dtype` the saved precision.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    if timesteps is None and num_steps == 1:
        timesteps = [conditioning_timestep]
    model = merged_unet(unet, dtype)
    build = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.build-", dir=out_dir.parent))
    try:
        model.save_pretrained(build, safe_serialization=True)
        info = {
            "format": "dmdr-unet-export",
            "version": 1,
            "conditioning_timestep": int(conditioning_timestep),
            "num_steps": int(num_steps),
            "timesteps": None if timesteps is None else [int(s) for s in timesteps],
            "prediction_type": "epsilon",
            "guidance_scale": 0,
            "dtype": str(model.dtype).removeprefix("torch."),
            "how_to_sample": (
                "unet = UNet2DConditionModel.from_pretrained(<this folder>); pipe = "
                "StableDiffusionXLPipeline.from_pretrained(<SDXL base>, unet=unet); "
                "pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config); "
                "pipe(prompt, num_inference_steps=len(timesteps), timesteps=timesteps, guidance_scale=0). "
                "Each step t of timesteps: eps = unet(x, t) (x ~ N(0, I) at the first), "
                "x0 = (x - sqrt(1 - alpha_bar_t) * eps) / sqrt(alpha_bar_t), then x = x0 re-noised with fresh noise "
                "to the next timestep; the last x0 is decoded with the VAE."
            ),
        }
        (build / EXPORT_INFO).write_text(json.dumps(info, indent=2) + "\n")
        replace_dir(build, out_dir)
    finally:
        shutil.rmtree(build, ignore_errors=True)
    return out_dir


def write(source, out: Path, dtype: str) -> Path:
    """`--format diffusers` of an `ExportSource`: the UNet folder with the run's sampling timesteps."""
    from dmdr.exports import torch_dtype

    return export_unet(source.unet, out, conditioning_timestep=source.conditioning_timestep,
                       num_steps=source.cfg.sample_num_steps, timesteps=source.timesteps, dtype=torch_dtype(dtype))
