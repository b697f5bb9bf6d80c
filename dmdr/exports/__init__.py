"""`dmdr export`: the trained generator in the formats people use it in.

One module per format, each with a function ``write(source, out, dtype)`` given an `ExportSource`
(the run's config, the loaded generator and its sampling timesteps):

    diffusers_unet  a diffusers UNet2DConditionModel folder plus dmdr_export.json (`--format diffusers`)

`export()` loads the checkpoint once and hands it to the chosen format.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from dmdr.config import TrainConfig
    from dmdr.models.sdxl import SDXLParts

FORMATS = ("diffusers",)
DTYPES = ("fp32", "fp16", "bf16")


def torch_dtype(name: str) -> "torch.dtype":
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


@dataclass
class ExportSource:
    """A checkpoint loaded for export: the run's config and directory, the checkpoint step, the SDXL
    parts it was trained from (teacher UNet, VAE, text encoders), the generator UNet (with its LoRA,
    if any, unmerged) and the sampling timesteps (one per generator step)."""

    cfg: "TrainConfig"
    run_dir: Path
    step: int
    parts: "SDXLParts"
    unet: "torch.nn.Module"
    timesteps: list[int]

    @property
    def conditioning_timestep(self) -> int:
        """One step: the timestep the generator was trained at (a --generator-timesteps list's entry)."""
        return self.timesteps[0] if len(self.timesteps) == 1 else self.cfg.conditioning_timestep


def load_source(run_dir: Path, step: str, overrides: dict | None = None) -> ExportSource:
    """Load checkpoint ``step`` ('latest' or a number) of the run in ``run_dir`` on the CPU."""
    import torch

    from dmdr import inference

    cfg = inference.load_run_config(run_dir, overrides)
    ckpt_step = inference.find_checkpoint(run_dir, step)
    parts, unet = inference.load_generator(cfg, run_dir, ckpt_step, torch.device("cpu"))
    steps = [int(t) for t in inference.sampling_grid(cfg)[:-1].tolist()]
    return ExportSource(cfg, run_dir, ckpt_step, parts, unet, steps)


def export(run_dir: Path, step: str, out: Path, *, fmt: str = "diffusers", dtype: str = "fp16",
           overrides: dict | None = None) -> Path:
    """Export checkpoint ``step`` of ``run_dir`` to ``out`` in format ``fmt`` and precision ``dtype``."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; one of {FORMATS}")
    source = load_source(run_dir, step, overrides)
    from dmdr.exports import diffusers_unet

    return diffusers_unet.write(source, out, dtype)
