"""A tiny TorchScript feature extractor with the FID Inception's call signature, saved to a file."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F


class TinyExtractor(torch.nn.Module):
    """``model(x, return_features=True)`` on NCHW images in 0..255, any size: ``dim`` features."""

    def __init__(self, dim: int = 8, size: int = 16):
        super().__init__()
        self.size = size
        self.conv = torch.nn.Conv2d(3, dim, 3, padding=1)
        self.proj = torch.nn.Linear(dim, dim)

    def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        x = F.interpolate(img.to(torch.float32) / 127.5 - 1, size=(self.size, self.size), mode="bilinear",
                          align_corners=False)
        feats = torch.tanh(self.conv(x)).mean(dim=(2, 3))
        feats = feats + self.proj(feats)
        return feats if return_features else feats.softmax(dim=1)


def write_tiny_extractor(path: Path, dim: int = 8, seed: int = 0) -> Path:
    """Save a seeded `TinyExtractor` as TorchScript (what `dmdr eval --inception` loads)."""
    torch.manual_seed(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.script(TinyExtractor(dim).eval()).save(str(path))
    return path
