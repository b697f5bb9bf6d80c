"""Gradient checkpointing that keeps the LoRA scale of the forward pass for the recompute.

diffusers applies a LoRA scale (`cross_attention_kwargs={"scale": s}`) by multiplying peft's
per-layer `scaling` for the duration of the UNet's forward and undoing it in a `finally`. A
checkpointed block is recomputed during backward, after that `finally`, so with plain
checkpointing the recompute runs at scale 1 and the LoRA gradients are wrong for any other
scale (the loss is not: the forward itself is right). Here each checkpointed call records the
scaling its block's LoRA layers have at forward time and the recompute runs with exactly that,
then puts back whatever was set at that moment: a scale set by one call (the real score at 0,
say) can never reach the backward of another. `tests/unit/test_gradient_checkpointing.py`.
"""
from __future__ import annotations

from typing import Any

import torch


def _lora_layers(module: torch.nn.Module) -> list[Any]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in module.modules() if isinstance(m, BaseTunerLayer) and hasattr(m, "scaling")]


def checkpoint_keeping_lora_scale(block: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
    """diffusers' `gradient_checkpointing_func`: non-reentrant checkpoint of `block(*args)` whose
    recompute sees the LoRA scaling of this forward call."""
    layers = _lora_layers(block)
    at_forward = [dict(layer.scaling) for layer in layers]

    def run(*inputs: Any, **kw: Any) -> Any:
        current = [dict(layer.scaling) for layer in layers]
        for layer, scaling in zip(layers, at_forward):
            layer.scaling.update(scaling)
        try:
            return block(*inputs, **kw)
        finally:
            for layer, scaling in zip(layers, current):
                layer.scaling.update(scaling)

    return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False, **kwargs)


def enable_gradient_checkpointing(unet: torch.nn.Module) -> None:
    """Gradient checkpointing on a diffusers UNet (plain or with a LoRA) that is exact at any
    LoRA scale; use it instead of `unet.enable_gradient_checkpointing()`."""
    unet.enable_gradient_checkpointing(gradient_checkpointing_func=checkpoint_keeping_lora_scale)
