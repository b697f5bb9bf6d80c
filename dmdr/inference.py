"""Use a trained generator: load it from a checkpoint or an exported folder, and sample (exports: dmdr.exports)."""
from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path

import torch
from safetensors.torch import load_file
from torchvision.utils import make_grid, save_image

from dmdr import checkpoint, data, fsdp
from dmdr.config import TrainConfig
from dmdr.dmd import sampler, timesteps as ts
from dmdr.errors import UserError
from dmdr.models import sdxl
from dmdr.storage.layout import pulled_subset_steps


def load_run_config(run_dir: Path, overrides: dict | None = None) -> TrainConfig:
    """The run's args.json; `overrides` (values not None) replace what names this machine's
    paths, e.g. the base model and cache of the training pod on another machine."""
    args = run_dir / "args.json"
    if not args.is_file():
        raise UserError(f"{run_dir} has no args.json: pass a run directory written by `dmdr train` "
                        "(or pulled with `dmdr pull`)")
    values = json.loads(args.read_text())
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    known = {f for f in TrainConfig.__dataclass_fields__}
    return TrainConfig(**{k: v for k, v in values.items() if k in known})


def available_steps(run_dir: Path) -> list[int]:
    """Steps a generator can be loaded from: complete checkpoints, and those `dmdr pull --only
    generator|lora` brought (ascending)."""
    ckpt = run_dir / "checkpoints"
    return sorted({*checkpoint.complete_steps(ckpt), *pulled_subset_steps(ckpt, "generator"),
                   *pulled_subset_steps(ckpt, "lora")})


def find_checkpoint(run_dir: Path, step: str) -> int:
    """The step to load: complete checkpoints, and those `dmdr pull --only generator|lora` brought."""
    steps = available_steps(run_dir)
    if not steps:
        raise UserError(f"{run_dir} has no complete checkpoint (checkpoints/step-N.complete.json)")
    if step == "latest":
        return steps[-1]
    if not step.isdigit() or int(step) not in steps:
        raise UserError(f"--step {step}: no complete checkpoint with that step in {run_dir}; have {steps}")
    return int(step)


def load_generator(cfg: TrainConfig, run_dir: Path, step: int, device: torch.device) -> tuple[sdxl.SDXLParts, torch.nn.Module]:
    """The SDXL parts plus the generator of checkpoint ``step`` (full weights or LoRA)."""
    parts = _base_parts(cfg)
    unet = copy.deepcopy(parts.unet)
    ckpt = run_dir / "checkpoints"
    if cfg.use_lora_gen:
        if cfg.xl_ode_pretrain_path:
            sdxl.load_ode_init(unet, cfg.xl_ode_pretrain_path)
        sdxl.add_generator_lora(unet, rank=2 * cfg.lora_rank, alpha=4 * cfg.lora_rank)
        sdxl.load_lora(unet, ckpt / "lora_gen" / f"step-{step}")
    else:
        step_dir = ckpt / "accelerator_1" / f"step-{step}"
        if fsdp.has_shards(step_dir):  # --distributed fsdp: consolidated here, from any number of shards
            fsdp.load_full_model(unet, step_dir)
        elif (step_dir / "model.safetensors").is_file():
            unet.load_state_dict(load_file(str(step_dir / "model.safetensors")), strict=True)
        else:
            raise UserError(f"{step_dir} has neither model.safetensors nor FSDP shards: the checkpoint is incomplete "
                            "(a pull with --only lora of a run without --use-lora-gen: pull --only generator)")
    return _on_device(parts, unet, device)


def load_export(folder: Path, overrides: dict | None, device: torch.device) -> tuple[TrainConfig, sdxl.SDXLParts, torch.nn.Module]:
    """A `dmdr export` folder: its UNet, the other SDXL parts from --pretrained-model, and a config
    that samples on the export's timesteps at the UNet's resolution."""
    from diffusers import UNet2DConditionModel

    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    if "pretrained_model" not in given:
        raise UserError(f"{folder} is an exported UNet: pass --pretrained-model, the SDXL base it was trained from "
                        "(its text encoders and VAE), e.g. a local diffusers folder")
    steps = json.loads((folder / sdxl.EXPORT_INFO).read_text()).get("timesteps")
    if not steps:
        raise UserError(f"{folder / sdxl.EXPORT_INFO} records no timesteps (an export by an older dmdr): export the run again")
    unet = UNet2DConditionModel.from_pretrained(folder, torch_dtype=torch.float32)
    cfg = TrainConfig(**given, resolution=8 * unet.config.sample_size, sample_num_steps=len(steps),
                      generator_timesteps=steps)
    return cfg, *_on_device(_base_parts(cfg), unet, device)


def _base_parts(cfg: TrainConfig) -> sdxl.SDXLParts:
    folder = sdxl.resolve_pretrained(cfg.pretrained_model, Path(cfg.cache_dir).expanduser())
    return sdxl.load_sdxl(folder, vae=cfg.vae, tiny_vae_path=cfg.tiny_vae_path)


def _on_device(parts: sdxl.SDXLParts, unet: torch.nn.Module, device: torch.device) -> tuple[sdxl.SDXLParts, torch.nn.Module]:
    for m in (parts.text_encoder_one, parts.text_encoder_two, parts.vae, unet):
        m.to(device).eval()
    parts.alphas_cumprod = parts.alphas_cumprod.to(device)
    return parts, unet


@torch.no_grad()
def seeded_images(denoise, vae, alphas_cumprod, grid, prompts: list[str], seed: int, resolution: int,
                  device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Images in [0, 1] from the few-step sampler, with a fixed noise seed per prompt (the same
    prompt gives the same image at every sample step and in `dmdr sample`)."""
    lat = resolution // 8
    noise = torch.stack([torch.randn((4, lat, lat), generator=torch.Generator().manual_seed(data.prompt_seed(p, seed)))
                         for p in prompts]).to(device)
    all_x0, _ = sampler.backward_simulation(denoise, noise, grid, alphas_cumprod,
                                            generator=torch.Generator().manual_seed(seed))
    x0 = all_x0[-1] if dtype is None else all_x0[-1].to(dtype)
    return sdxl.decode_to_images(vae, x0).float()


def sampling_grid(cfg: TrainConfig) -> torch.Tensor:
    """The run's generator grid (its step timesteps, then 0), as training sampled it."""
    return ts.generator_timesteps(cfg.sample_num_steps, cfg.shift, cfg.conditioning_timestep,
                                  steps=cfg.generator_timesteps)


def sample_images(cfg: TrainConfig, parts: sdxl.SDXLParts, unet, prompts: list[str], seed: int,
                  device: torch.device) -> torch.Tensor:
    """Images in [0, 1] for ``prompts`` from a loaded generator."""
    grid = sampling_grid(cfg)
    pe, pooled = sdxl.encode_prompts(parts, prompts, device)
    return seeded_images(lambda x, t: sdxl.predict_eps(unet, x, t, pe, pooled, cfg.resolution), parts.vae,
                         parts.alphas_cumprod, grid, prompts, seed, cfg.resolution, device)


def grid_shape(n: int) -> tuple[int, int]:
    """(rows, columns) for ``n`` tiles: a landscape rectangle close to a square, with at most one
    row not full (2 -> 1x2, 3 -> 1x3, 4 -> 2x2, 5/6 -> 2x3, 7/8 -> 2x4, 9 -> 3x3)."""
    rows = max(1, math.isqrt(n))
    return rows, max(1, math.ceil(n / rows))


def sample_grid_path(samples_dir: Path, step: int, seed: int) -> Path:
    """``samples/step-000600_seed-30.png``: the generator step and the base seed of the noise."""
    return samples_dir / f"step-{step:06d}_seed-{seed}.png"


def save_sample_grid(images: torch.Tensor, prompts: list[str], samples_dir: Path, step: int, seed: int) -> list[Path]:
    """Save ``images`` as one grid PNG and, beside it (same name, ``.json``), each tile's prompt,
    noise seed, row and column; returns [png, json]."""
    rows, cols = grid_shape(len(images))
    png = sample_grid_path(samples_dir, step, seed)
    png.parent.mkdir(parents=True, exist_ok=True)
    save_image(make_grid(images, nrow=cols), png)
    tiles = [{"row": i // cols, "col": i % cols, "prompt": p, "seed": data.prompt_seed(p, seed)}
             for i, p in enumerate(prompts)]
    meta = {"step": step, "seed": seed, "rows": rows, "cols": cols, "image": png.name, "tiles": tiles}
    captions = png.with_suffix(".json")
    tmp = captions.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, captions)
    return [png, captions]


def sample_to_dir(run_dir: Path, step: str, prompts: list[str], out_dir: Path, seed: int, device: str = "cpu",
                  overrides: dict | None = None) -> list[Path]:
    """PNGs ``0000.png``, ... for ``prompts``, and ``sample.json`` beside them: the checkpoint step, the
    sampling timesteps and each image's prompt and noise seed. ``run_dir`` is a run or a `dmdr export` folder."""
    dev = torch.device(device)
    if (run_dir / sdxl.EXPORT_INFO).is_file():
        ckpt_step = None
        cfg, parts, unet = load_export(run_dir, overrides, dev)
    else:
        cfg = load_run_config(run_dir, overrides)
        ckpt_step = find_checkpoint(run_dir, step)
        parts, unet = load_generator(cfg, run_dir, ckpt_step, dev)
    images = sample_images(cfg, parts, unet, prompts, seed, dev)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, img in enumerate(images):
        p = out_dir / f"{i:04d}.png"
        save_image(img, p)
        paths.append(p)
    meta = {"step": ckpt_step, "seed": seed, "timesteps": sampling_grid(cfg)[:-1].tolist(),
            "images": [{"image": p.name, "prompt": t, "seed": data.prompt_seed(t, seed)} for p, t in zip(paths, prompts)]}
    (out_dir / "sample.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return paths
