"""Training-step benchmark: steps/s and peak memory of the real DMDR step functions.

* ``--mode tiny`` (default without a GPU): the tiny preset through the real ``Trainer``.
* ``--mode sdxl`` (needs a GPU): the SDXL-size UNet from ``--unet-config`` (default
  ``../shared/reference/sdxl_unet_config.json``, random weights) through the real ``Trainer``
  and its real ``prepare_batch`` / ``train_step`` (see
  ``sdxl_bench.py`` for what is random). Variants (precision, gradient checkpointing, batch,
  rewards, 8-bit AdamW, FSDP) run one after another in one process, each after warm-up; each
  reports s/generator-step, images/s, peak GPU memory and, with ``--flops``, the FLOPs that
  torch.utils.flop_counter counts for one generator step and the model FLOP utilisation
  against ``--peak-tflops``. ``tests/bench/gpu_sdxl.sh`` is the prepared GPU run.

A "generator step" is ``--ratio-update`` inner steps (each: backward simulation of a new batch +
guidance update), the last one with the generator update (DMD with CFG on both scores), as in
training; images/s counts the images the generator makes for them.
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


def time_generator_steps(trainer, steps: int, warmup: int, count_flops=None) -> dict:
    """Run ``warmup`` generator steps, one more under ``count_flops`` if given, then ``steps``
    timed ones, through the loop's own ``Trainer.train_step``; returns seconds per step,
    throughput (generated images: every inner step samples one batch) and peak memory."""
    accumulation = trainer.cfg.gradient_accumulation_steps
    images = 0

    def one_gen_step():  # inner steps until the next generator update (--ratio-update of them)
        nonlocal images
        while True:
            batches = [trainer.prepare_batch(trainer.stream.next_batch()) for _ in range(accumulation)]
            images += sum(len(b["prompts"]) for b in batches)
            _, gen_logs = trainer.train_step(batches)
            trainer.inner_step += 1
            if gen_logs is not None:
                trainer.global_step += 1
                return

    for _ in range(warmup):
        one_gen_step()
    flops = count_flops(one_gen_step) if count_flops else None
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    images, t0 = 0, time.perf_counter()
    for _ in range(steps):
        one_gen_step()
    sync()
    dt = (time.perf_counter() - t0) / steps
    out = {"s_per_gen_step": dt, "gen_steps_per_s": 1 / dt,
           "images_per_s": images / steps / dt}
    if flops is not None:
        out["flops_per_gen_step"] = flops
    if torch.cuda.is_available():
        out["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
        out["peak_gpu_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
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


def bench_sdxl(args) -> list[dict]:
    """Each variant after ``--warmup`` steps: one step under the FLOP counter, then ``--steps`` timed."""
    from sdxl_bench import Variant, flops_of, reset_accelerate, sdxl_trainer

    config = json.loads(Path(args.unet_config).read_text())
    rows = []
    for text in args.variants:
        v = Variant.parse(text)
        row = {"mode": "sdxl", "variant": text, "mixed_precision": v.mixed_precision, "batch": v.batch,
               "gradient_checkpointing": v.checkpointing, "rewards": v.rewards, "adam8bit": v.adam8bit,
               "fsdp": v.fsdp, "resolution": args.resolution}
        trainer = None
        try:
            trainer = sdxl_trainer(config, v, args.resolution, args.reward_archs)
            row["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
            row["params_gen_M"] = sum(p.numel() for p in trainer.models.generator.parameters()) / 1e6
            timing = time_generator_steps(trainer, args.steps, args.warmup,
                                          count_flops=flops_of if args.flops else None)
            row.update(timing)
            if "flops_per_gen_step" in timing:
                row["tflops_per_s"] = timing["flops_per_gen_step"] / timing["s_per_gen_step"] / 1e12
                row["mfu"] = row["tflops_per_s"] / args.peak_tflops
        except torch.OutOfMemoryError as e:
            row["error"] = f"OOM: {str(e).splitlines()[0]}"
        except Exception as e:  # a variant that breaks is a result too; the others still run
            import traceback

            traceback.print_exc()
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        print(json.dumps(row), flush=True)
        rows.append(row)
        del trainer
        reset_accelerate()
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
    p.add_argument("--variants", nargs="+", default=["bf16/nockpt/b1", "bf16/ckpt/b4"],
                   help="sdxl variants, e.g. bf16/ckpt/b4/adam8bit (tokens: no|fp16|bf16, ckpt|nockpt, bN, "
                        "rewards, adam8bit, fsdp, loragen; see sdxl_bench.py)")
    p.add_argument("--reward-archs", nargs=2, default=["ViT-H-14-quickgelu", "ViT-H-14"],
                   help="open_clip names or config JSONs of the CLIP and HPS rewards (random weights)")
    p.add_argument("--flops", action="store_true", help="count one generator step's FLOPs (torch.utils.flop_counter)")
    p.add_argument("--peak-tflops", type=float, default=790.0,
                   help="peak dense bf16 TFLOP/s for the utilisation figure (H200: ~790 measured)")
    p.add_argument("--json", help="also write the rows to this file")
    args = p.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    rows = bench_tiny(args) if args.mode == "tiny" else bench_sdxl(args)
    if args.mode == "tiny":  # sdxl rows are printed as each variant ends
        for r in rows:
            print(json.dumps(r))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
