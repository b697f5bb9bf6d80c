"""The two reward models by name: what file each expects and its default architecture.

Kept apart from `dmdr.rewards` (torch, open_clip) so the CLI can show them in ``--help`` cheaply.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RewardKind:
    """What one named reward expects; the texts are used in error messages."""

    label: str  # human name of the model
    file_name: str  # the file users download
    flag: str  # option that passes the checkpoint
    arch_flag: str  # option that passes the architecture
    nested: bool  # True: weights are under "state_dict"; False: a plain state dict
    default_arch: str  # open_clip model name used when the spec names none


KINDS: dict[str, RewardKind] = {
    "clip": RewardKind(
        "DFN5B-CLIP-ViT-H-14 CLIP reward", "Apple_CLIP-H-14-224.bin",
        "--clip-reward-model", "--clip-reward-arch", nested=False,
        default_arch="ViT-H-14-quickgelu",
    ),
    "hps": RewardKind(
        "HPSv2.1 reward", "HPS_v2.1_compressed.pt",
        "--hpsv2-reward-model", "--hps-reward-arch", nested=True,
        default_arch="ViT-H-14",
    ),
}
