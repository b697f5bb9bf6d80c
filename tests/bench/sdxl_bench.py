"""SDXL-size variants of the step benchmark (``bench_step.py --mode sdxl``).

The real ``Trainer`` is built with its real ``components.build_models`` (generator copy, guidance
LoRA, dtypes, gradient checkpointing, accelerate/FSDP wrapping, optimisers); only what would need
downloaded weights is replaced by random models of the real shapes:

* the teacher UNet: ``UNet2DConditionModel.from_config(sdxl_unet_config.json)``, initialised
  directly on the device;
* text conditioning: random ``[B, 77, 2048]`` / ``[B, 1280]`` embeddings (SDXL's shapes) instead
  of the two text encoders;
* the tiny VAE (taesdxl's architecture) and, in ``rewards`` variants, both reward models
  (open_clip ViT-H-14-quickgelu for CLIP, ViT-H-14 for HPSv2.1), random weights.

A variant is a ``/``-separated list of tokens, e.g. ``bf16/ckpt/b4/adam8bit``:
``no|fp16|bf16`` (mixed precision), ``ckpt|nockpt`` (gradient checkpointing), ``bN`` (batch per
process), and the flags ``rewards`` (reward phase on), ``adam8bit`` (bitsandbytes AdamW8bit),
``fsdp`` (``--distributed fsdp``; run the benchmark under ``torchrun`` for it), ``loragen``
(``--use-lora-gen``).
"""
from __future__ import annotations

import contextlib
import tempfile
from dataclasses import dataclass
from unittest import mock

import torch

SDXL_TEXT = (77, 2048)
SDXL_POOLED = 1280


@dataclass
class Variant:
    name: str
    mixed_precision: str = "bf16"
    checkpointing: bool = False
    batch: int = 1
    rewards: bool = False
    adam8bit: bool = False
    fsdp: bool = False
    lora_gen: bool = False

    @classmethod
    def parse(cls, text: str) -> "Variant":
        v = cls(name=text)
        for tok in text.split("/"):
            if tok in ("no", "fp16", "bf16"):
                v.mixed_precision = tok
            elif tok in ("ckpt", "nockpt"):
                v.checkpointing = tok == "ckpt"
            elif tok.startswith("b") and tok[1:].isdigit():
                v.batch = int(tok[1:])
            elif tok in ("rewards", "adam8bit", "fsdp"):
                setattr(v, tok, True)
            elif tok == "loragen":
                v.lora_gen = True
            else:
                raise ValueError(f"variant {text!r}: unknown token {tok!r}")
        return v


def _random_parts(unet_config: dict, device: torch.device):
    """SDXLParts with a random SDXL UNet and tiny VAE; the text encoders are never called."""
    from diffusers import AutoencoderTiny, UNet2DConditionModel

    from dmdr.dmd import sampler
    from dmdr.models import sdxl

    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(unet_config)
        vae = AutoencoderTiny()  # taesdxl's architecture (its default config)
    for m in (unet, vae):
        m.requires_grad_(False)
        m.eval()
    return sdxl.SDXLParts(
        tokenizer_one=None, tokenizer_two=None, text_encoder_one=torch.nn.Identity(),
        text_encoder_two=torch.nn.Identity(), unet=unet, vae=vae, vae_kind="tiny",
        alphas_cumprod=sampler.scaled_linear_alphas_cumprod(), scheduler_config={},
    )


def _random_text(parts, prompts, device):
    """Stands in for ``sdxl.encode_prompts``: SDXL-shaped embeddings in the frozen parts' dtype."""
    g = torch.Generator().manual_seed(len(prompts))
    dtype = parts.vae.dtype
    pe = torch.randn((len(prompts), *SDXL_TEXT), generator=g).to(device, dtype)
    pooled = torch.randn((len(prompts), SDXL_POOLED), generator=g).to(device, dtype)
    return pe, pooled


REWARD_ARCHS = ("ViT-H-14-quickgelu", "ViT-H-14")  # CLIP (DFN5B), HPSv2.1: ~1B parameters each


def random_rewards(device: torch.device, dtype: torch.dtype, archs=REWARD_ARCHS, weight: float = 0.3):
    """Both reward models of the recipe with random weights; ``archs`` are open_clip names or
    config JSONs (a tiny config lets the CPU smoke test run the same code)."""
    from dmdr.rewards import RewardModel, RewardSet, RewardSpec, build_model, resolve_arch

    specs = [RewardSpec("clip", path="<random>", arch=archs[0], weight=weight),
             RewardSpec("hps", path="<random>", arch=archs[1], weight=weight, prefix="Realistic photo")]
    models = {}
    for spec in specs:
        arch = resolve_arch(spec.arch_or_default, spec.kind)
        models[spec.name] = RewardModel(spec.name, build_model(arch, device).to(dtype), arch, spec.prefix)
    return RewardSet.from_models(specs, models, device=device, dtype=dtype)


def sdxl_trainer(unet_config: dict, v: Variant, resolution: int, reward_archs=REWARD_ARCHS):
    """The real Trainer over random SDXL-size models (see the module docstring)."""
    from dmdr.config import TrainConfig
    from dmdr.models import sdxl
    from dmdr.train import Trainer

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = TrainConfig(
        pretrained_model="<random sdxl>", resolution=resolution, batch_size=v.batch,
        mixed_precision=v.mixed_precision, lora_rank=32, gradient_checkpointing=v.checkpointing,
        use_8bit_adam=v.adam8bit, distributed="fsdp" if v.fsdp else "ddp", use_lora_gen=v.lora_gen,
        ratio_update=5, cfg_r=7.0, cfg_f=1.0, learning_rate_gen=1e-7, learning_rate_gui=1e-7,
        cold_start_iter=0, max_train_steps=10**6, output_dir=tempfile.mkdtemp(prefix="dmdr-bench-"),
        xl_ode_pretrain_path=None,
    )
    parts = _random_parts(unet_config, device)
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(sdxl, "resolve_pretrained", lambda spec, cache: spec))
        stack.enter_context(mock.patch.object(sdxl, "load_sdxl", lambda *a, **k: parts))
        stack.enter_context(mock.patch.object(sdxl, "encode_prompts", _random_text))
        trainer = Trainer(cfg)
    trainer.encode = lambda prompts: _random_text(parts, prompts, trainer.device)
    if v.rewards:
        trainer.rewards = random_rewards(trainer.device, trainer.models.dtype, reward_archs)
    return trainer


def reset_accelerate() -> None:
    """Let the next variant build accelerators with another mixed precision in this process."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=False)


def flops_of(fn) -> int:
    """FLOPs of one call of ``fn`` as torch.utils.flop_counter counts them (recomputation included)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()
