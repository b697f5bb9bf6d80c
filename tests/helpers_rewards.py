"""Test helpers for reward models: tiny checkpoints, a briefly trained tiny CLIP, PNG folders."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from dmdr.models.tiny_clip import random_open_clip_state_dict, tiny_open_clip_config
from dmdr.rewards import OPENAI_MEAN, OPENAI_STD, _tokenizer

# Distinct colour/caption pairs a tiny CLIP can learn in a few steps.
COLOURS = {
    "red": (0.9, 0.1, 0.1),
    "green": (0.1, 0.8, 0.2),
    "blue": (0.1, 0.2, 0.9),
    "yellow": (0.9, 0.9, 0.1),
}


def colour_images(size: int = 48) -> tuple[torch.Tensor, list[str]]:
    """One image per colour (a colour field with a darker square) and its caption."""
    images, captions = [], []
    for name, rgb in COLOURS.items():
        img = torch.tensor(rgb).view(3, 1, 1).expand(3, size, size).clone()
        img[:, size // 4: size // 2, size // 4: size // 2] *= 0.5
        images.append(img)
        captions.append(f"a photo of a {name} square")
    return torch.stack(images), captions


def train_tiny_clip(config: dict, steps: int = 40, seed: int = 0) -> dict[str, torch.Tensor]:
    """Train a tiny open_clip CLIP contrastively on `colour_images`; return its state dict.

    Runs single-threaded: on a shared CPU the tiny matmuls are many times faster that way.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(config, steps, seed)
    finally:
        torch.set_num_threads(threads)


def _train(config: dict, steps: int, seed: int) -> dict[str, torch.Tensor]:
    from open_clip.model import CLIP

    torch.manual_seed(seed)
    model = CLIP(**config)
    model.load_state_dict(random_open_clip_state_dict(config, seed))
    images, captions = colour_images()
    size = config["vision_cfg"]["image_size"]
    x = F.interpolate(images, size=(size, size), mode="bicubic", antialias=True)
    x = (x - torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1)) / torch.tensor(OPENAI_STD).view(1, 3, 1, 1)
    tokens = _tokenizer(77)(captions)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    labels = torch.arange(len(captions))
    for _ in range(steps):
        img_f, txt_f, scale = model(x, tokens)
        logits = scale * img_f @ txt_f.T
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def write_config(path: Path, **overrides) -> Path:
    """Write a tiny open_clip config JSON (with `tiny_open_clip_config` overrides)."""
    path.write_text(json.dumps(tiny_open_clip_config(**overrides)), encoding="utf-8")
    return path


def write_pngs(directory: Path, images: torch.Tensor, names: list[str]) -> list[Path]:
    """Save [N,3,H,W] images in [0,1] as 8-bit RGB PNGs named ``names``."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for img, name in zip(images, names):
        arr = (img.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(arr).save(directory / name)
        paths.append(directory / name)
    return paths


def block_network(monkeypatch) -> None:
    """Make every socket connection and name lookup raise, to prove code runs offline."""

    def refuse(*args, **kwargs):
        raise OSError("network access blocked by the test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
