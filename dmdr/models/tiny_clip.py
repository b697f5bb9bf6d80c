"""Tiny random open_clip reward models, saved in the real CLIP and HPSv2.1 file formats.

Tests, the trainer's tests and the image's CI build use them in place of the 4 GB
DFN5B-CLIP-ViT-H-14 and HPSv2.1 checkpoints: same model class, same tokenizer (open_clip's bundled
BPE, so context 77 and vocab 49408), same file formats, a few MB and milliseconds on a CPU.
Pass the written config JSON as ``--clip-reward-arch`` / ``--hps-reward-arch``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

#: File names written by `write_tiny_reward_checkpoints`.
CONFIG_NAME = "tiny-open-clip.json"
CLIP_NAME = "tiny-clip.bin"
HPS_NAME = "tiny-hps.pt"


def tiny_open_clip_config(
    embed_dim: int = 16,
    image_size: int = 32,
    patch_size: int = 8,
    width: int = 32,
    layers: int = 2,
    heads: int = 2,
    quick_gelu: bool = False,
) -> dict:
    """An open_clip model config (the model_configs/*.json layout) for a tiny ViT CLIP.

    The text tower keeps CLIP's context length 77 and vocabulary 49408 so that the bundled
    tokenizer fits it; everything else is small.
    """
    return {
        "embed_dim": embed_dim,
        "quick_gelu": quick_gelu,
        "vision_cfg": {
            "image_size": image_size,
            "layers": layers,
            "width": width,
            "head_width": width // heads,
            "patch_size": patch_size,
        },
        "text_cfg": {
            "context_length": 77,
            "vocab_size": 49408,
            "width": width,
            "heads": heads,
            "layers": layers,
        },
    }


def random_open_clip_state_dict(config: dict, seed: int) -> dict[str, torch.Tensor]:
    """The state dict of an open_clip CLIP built from ``config`` with random weights."""
    from open_clip.model import CLIP

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIP(**config)
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def write_tiny_reward_checkpoints(directory: str | Path, seed: int = 0) -> dict[str, Path]:
    """Write a tiny config JSON, a CLIP-format file and an HPS-format file into ``directory``.

    Returns ``{"config": json, "clip": plain state dict file, "hps": {"state_dict": ...} file}``.
    The two models have different random weights; the same seed gives the same files.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = tiny_open_clip_config()
    paths = {"config": directory / CONFIG_NAME, "clip": directory / CLIP_NAME, "hps": directory / HPS_NAME}
    paths["config"].write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    torch.save(random_open_clip_state_dict(config, seed), paths["clip"])
    torch.save({"state_dict": random_open_clip_state_dict(config, seed + 1)}, paths["hps"])
    return paths
