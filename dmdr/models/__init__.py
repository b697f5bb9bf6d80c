"""SDXL model loading, LoRA and the tiny random SDXL pipeline (exports: dmdr.exports)."""

from dmdr.models.sdxl import (
    LORA_TARGET_MODULES,
    SDXLParts,
    add_generator_lora,
    add_guidance_lora,
    decode_to_images,
    encode_prompts,
    has_lora,
    load_lora,
    load_ode_init,
    load_sdxl,
    lora_state_dict,
    predict_eps,
    register_pretrained_resolver,
    resolve_pretrained,
    save_lora,
    time_ids,
    unwrap,
)
from dmdr.models.tiny import TINY_SPEC_VERSION, build_tiny_sdxl

__all__ = [
    "LORA_TARGET_MODULES", "SDXLParts", "TINY_SPEC_VERSION", "add_generator_lora", "add_guidance_lora",
    "build_tiny_sdxl", "decode_to_images", "encode_prompts", "has_lora", "load_lora",
    "load_ode_init", "load_sdxl", "lora_state_dict", "predict_eps",
    "register_pretrained_resolver", "resolve_pretrained", "save_lora", "time_ids", "unwrap",
]
