"""Training-step benchmark: steps/s and peak memory of the real DMDR step functions.

* ``--mode tiny`` (default without a GPU): the tiny preset through the real ``Trainer``.
* ``--mode sdxl`` (needs a GPU): the SDXL-size UNet from ``--unet-config`` (default
  ``../shared/reference/sdxl_unet_config.json``, random weights) as generator and as guidance
  model (bf16 base + fp32 LoRA), random text embeddings of SDXL's shapes, the real
  ``prepare_batch`` / ``guidance_step`` / ``generator_step``. Variants (gradient checkpointing,
  batch size) run side by side in one process, each after warm-up, so they compare directly.

A "generator step" is ``--ratio-update`` inner steps (backward simulation + guidance update)
plus one generator update (DMD with CFG on both scores), as in training.
"""
from __future__ import annotations

import argparse
import gc
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
DEFAULT_UNET_CONFIG = REPO.parent / "shared" / "reference" / "sdxl_unet_config.json"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def time_generator_steps(trainer, steps: int, warmup: int) -> dict:
    """Run ``warmup`` then ``steps`` generator steps; returns seconds per step and throughput."""
    ratio = trainer.cfg.ratio_update

    def one_gen_step():
        for i in range(ratio):
            batch = trainer.prepare_batch(trainer.stream.next_batch())
            trainer.guidance_step(batch)
            trainer.inner_step += 1
        batch = trainer.prepare_batch(trainer.stream.next_batch())
        trainer.guidance_step(batch)
        trainer.generator_step(batch)
        trainer.inner_step += 1
        trainer.global_step += 1

    for _ in range(warmup):
        one_gen_step()
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        one_gen_step()
    sync()
    dt = (time.perf_counter() - t0) / steps
    out = {"s_per_gen_step": dt, "gen_steps_per_s": 1 / dt,
           "images_per_s": trainer.cfg.batch_size * (ratio + 1) / dt}
    if torch.cuda.is_available():
        out["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
    out["peak_rss_mb"] = peak_rss_mb()
    return out


def bench_tiny(args) -> list[dict]:
    from dmdr.config import build_config
    from dmdr.train import Trainer

    with tempfile.TemporaryDirectory() as tmp:
        cfg = build_config({"preset": "tiny", "output_dir": tmp, "cache_dir": args.cache_dir,
                            "max_train_steps": 10**6})
        trainer = Trainer(cfg)
        row = {"mode": "tiny", "device": str(trainer.device), "batch": cfg.batch_size,
               "resolution": cfg.resolution, "ratio_update": cfg.ratio_update}
        row.update(time_generator_steps(trainer, args.steps, args.warmup))
        return [row]


class _RandomText:
    """SDXL-shaped text conditioning without text encoders: [B, 77, 2048] and [B, 1280]."""

    def __init__(self, device, dtype):
        self.device, self.dtype = device, dtype

    def __call__(self, prompts):
        g = torch.Generator().manual_seed(len(prompts))
        pe = torch.randn((len(prompts), 77, 2048), generator=g).to(self.device, self.dtype)
        pooled = torch.randn((len(prompts), 1280), generator=g).to(self.device, self.dtype)
        return pe, pooled


class _Stream:
    def __init__(self, batch):
        self.batch = batch

    def next_batch(self):
        return [f"prompt {i}" for i in range(self.batch)]


def sdxl_trainer(unet_config: dict, batch: int, resolution: int, checkpointing: bool, mixed: str):
    """A Trainer whose models are random SDXL-size UNets; the step methods are the real ones."""
    from diffusers import UNet2DConditionModel

    from dmdr import components
    from dmdr.config import TrainConfig
    from dmdr.dmd import sampler, timesteps as ts
    from dmdr.models import sdxl
    from dmdr.train import Trainer

    cfg = TrainConfig(resolution=resolution, batch_size=batch, mixed_precision=mixed, lora_rank=32,
                      gradient_checkpointing=checkpointing, ratio_update=5, cfg_r=7.0, cfg_f=1.0,
                      learning_rate_gen=1e-7, learning_rate_gui=1e-7, output_dir=tempfile.mkdtemp())
    t = Trainer.__new__(Trainer)
    t.cfg = cfg
    t.acc, t.acc_gui = components.make_accelerators(cfg)
    t.device = t.acc.device
    dtype = components.INFERENCE_DTYPES[mixed]
    torch.manual_seed(0)
    generator = UNet2DConditionModel.from_config(unet_config).to(t.device)
    guidance = UNet2DConditionModel.from_config(unet_config).to(t.device, dtype)
    guidance.requires_grad_(False)
    sdxl.add_guidance_lora(guidance, rank=cfg.lora_rank)
    for p in guidance.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    if checkpointing:
        generator.enable_gradient_checkpointing()
        guidance.enable_gradient_checkpointing()
    t.prepare_models(generator, guidance)
    t.encode = _RandomText(t.device, dtype)
    t.neg = t.encode([""])
    t.stream = _Stream(batch)
    t.alphas = sampler.scaled_linear_alphas_cumprod().to(t.device)
    t.grid = ts.generator_timesteps(1, 1.0, 399)
    t.s_type_gui = "uniform"
    t.rewards = None
    t.models = components.Models(parts=None, generator=generator, guidance=guidance, dtype=dtype)
    t.global_step = t.inner_step = 0
    return t


def bench_sdxl(args) -> list[dict]:
    config = json.loads(Path(args.unet_config).read_text())
    rows = []
    for variant in args.variants:
        ckpt, batch = variant.split(":")
        row = {"mode": "sdxl", "variant": variant, "gradient_checkpointing": ckpt == "ckpt", "batch": int(batch),
               "resolution": args.resolution, "mixed_precision": args.mixed_precision}
        try:
            trainer = sdxl_trainer(config, int(batch), args.resolution, ckpt == "ckpt", args.mixed_precision)
            row["device"] = str(trainer.device)
            row["params_gen_M"] = sum(p.numel() for p in trainer.models.generator.parameters()) / 1e6
            row.update(time_generator_steps(trainer, args.steps, args.warmup))
        except torch.OutOfMemoryError as e:
            row["error"] = f"OOM: {str(e).splitlines()[0]}"
        except RuntimeError as e:
            row["error"] = str(e).splitlines()[0]
        print(json.dumps(row), flush=True)
        rows.append(row)
        trainer = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=("tiny", "sdxl"), default="sdxl" if torch.cuda.is_available() else "tiny")
    p.add_argument("--steps", type=int, default=3, help="timed generator steps per variant")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "dmdr"))
    p.add_argument("--unet-config", default=str(DEFAULT_UNET_CONFIG))
    p.add_argument("--resolution", type=int, default=1024)
    p.add_argument("--mixed-precision", default="bf16", choices=("no", "fp16", "bf16"))
    p.add_argument("--variants", nargs="+", default=["nockpt:1", "ckpt:1", "ckpt:2", "ckpt:4"],
                   help="checkpointing:batch pairs, checkpointing in {ckpt, nockpt}")
    p.add_argument("--json", help="also write the rows to this file")
    args = p.parse_args(argv)
    rows = bench_tiny(args) if args.mode == "tiny" else bench_sdxl(args)
    for r in rows:
        print(json.dumps(r))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
