"""Assemble what a run trains: accelerators, the SDXL parts, generator, guidance model,
optimisers and LR schedulers. Kept apart from the loop so ``train.py`` reads top to bottom."""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration

from dmdr import tracking
from dmdr.config import TrainConfig
from dmdr.errors import UserError
from dmdr.logs import get_logger
from dmdr.models import sdxl
from dmdr.models.checkpointing import enable_gradient_checkpointing

INFERENCE_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def make_accelerators(cfg: TrainConfig) -> tuple[Accelerator, Accelerator]:
    """Two accelerators sharing one process group: ``accelerator_1`` owns the generator and
    its optimiser, ``accelerator_2`` the guidance model (the reference's checkpoint layout).
    With DDP both prepare their model on the same devices; FSDP is applied by ``dmdr.fsdp``."""
    kwargs: dict[str, Any] = {
        "cpu": not torch.cuda.is_available(),  # accelerate only goes multi-process (gloo) on CPU when told
        "mixed_precision": cfg.mixed_precision,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        # LR schedules count optimizer steps: without this accelerate steps a prepared scheduler
        # once per process at each optimizer step (warmup over after W / N steps on N processes)
        "step_scheduler_with_optimizer": False,
        "project_config": ProjectConfiguration(project_dir=str(cfg.run_dir), logging_dir=str(cfg.run_dir / "tensorboard")),
    }
    trackers = tracking.parse(cfg.report_to)
    if trackers:
        kwargs["log_with"] = trackers
    acc_gen = Accelerator(**kwargs)
    kwargs.pop("log_with", None)
    acc_gui = Accelerator(**kwargs)
    return acc_gen, acc_gui


@dataclass
class Models:
    parts: sdxl.SDXLParts  # tokenizers, text encoders, VAE, alphas_cumprod (frozen)
    generator: torch.nn.Module  # trainable: the full UNet or a LoRA on it
    guidance: torch.nn.Module  # the teacher UNet + the fake-score LoRA (only the LoRA trains)
    dtype: torch.dtype  # inference dtype of frozen parts


def resolve_input_file(path: str | None, what: str) -> str | None:
    """A relative input path that does not exist here is looked up in $DMDR_WEIGHTS_DIR
    (where the image bundles the reward weights)."""
    if path is None:
        return None
    p = Path(path).expanduser()
    if p.exists():
        return str(p)
    weights_dir = os.environ.get("DMDR_WEIGHTS_DIR")
    if weights_dir and not p.is_absolute() and (Path(weights_dir) / p).exists():
        return str(Path(weights_dir) / p)
    hint = f" or $DMDR_WEIGHTS_DIR ({weights_dir})" if weights_dir else ""
    raise UserError(f"{what}: file {path} not found in the working directory{hint}; pass the right path")


def build_models(cfg: TrainConfig, device: torch.device) -> Models:
    log = get_logger()
    dtype = INFERENCE_DTYPES[cfg.mixed_precision]
    folder = sdxl.resolve_pretrained(cfg.pretrained_model, Path(cfg.cache_dir).expanduser())
    parts = sdxl.load_sdxl(folder, vae=cfg.vae, tiny_vae_path=cfg.tiny_vae_path)
    teacher = parts.unet

    generator = copy.deepcopy(teacher)
    if cfg.xl_ode_pretrain_path:  # any step count: also DMD2's 4-step UNet for --sample-num-steps 4
        sdxl.load_ode_init(generator, cfg.xl_ode_pretrain_path)
        log.info(f"{cfg.sample_num_steps}-step generator initialised from {cfg.xl_ode_pretrain_path}")
    elif cfg.sample_num_steps == 1 and cfg.pretrained_model != "builtin:tiny":
        log.warning(
            "WARNING: one-step training without --xl-ode-pretrain-path: the generator starts from the "
            "teacher, which gives noise artifacts for SDXL. Pass the DMD2 ODE-regression init "
            "(sdxl_lr1e-5_8node_ode_pretraining_10k_cond399_checkpoint_model_002000.bin)."
        )
    if cfg.use_lora_gen:
        generator.requires_grad_(False)
        sdxl.add_generator_lora(generator, rank=2 * cfg.lora_rank, alpha=4 * cfg.lora_rank)
    else:
        generator.requires_grad_(True)

    guidance = teacher  # no second full teacher: the real score is this UNet at LoRA scale 0
    guidance.requires_grad_(False)
    guidance.to(dtype=dtype)
    sdxl.add_guidance_lora(guidance, rank=cfg.lora_rank)
    for p in guidance.parameters():  # trainable LoRA weights stay in fp32
        if p.requires_grad:
            p.data = p.data.float()

    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(generator)  # exact at any LoRA scale, unlike diffusers' own
        enable_gradient_checkpointing(guidance)
    for m in (parts.text_encoder_one, parts.text_encoder_two, parts.vae):
        m.to(device, dtype=dtype)
    parts.alphas_cumprod = parts.alphas_cumprod.to(device)
    generator.to(device)
    guidance.to(device)
    return Models(parts=parts, generator=generator, guidance=guidance, dtype=dtype)


def trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def make_optimizer(cfg: TrainConfig, params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    if cfg.use_8bit_adam:
        if not torch.cuda.is_available():
            raise UserError("--use-8bit-adam needs a CUDA GPU (bitsandbytes); drop the flag on CPU")
        try:
            import bitsandbytes as bnb
        except ImportError as e:
            raise UserError("--use-8bit-adam needs bitsandbytes: pip install 'dmdr[bnb]'") from e
        cls = bnb.optim.AdamW8bit
    else:
        cls = torch.optim.AdamW
    return cls(params, lr=lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon, weight_decay=weight_decay)


def make_scheduler(cfg: TrainConfig, optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = cfg.lr_warmup_steps
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)


def register_adapter_hooks(acc: Accelerator, skip_weights: bool) -> None:
    """With a frozen base (guidance model, LoRA generator) accelerate must not save or load the
    full UNet each checkpoint: the adapters go to lora_gui/lora_gen instead."""
    if not skip_weights:
        return

    def save_hook(models, weights, output_dir):
        weights.clear()

    def load_hook(models, input_dir):
        models.clear()

    acc.register_save_state_pre_hook(save_hook)
    acc.register_load_state_pre_hook(load_hook)
