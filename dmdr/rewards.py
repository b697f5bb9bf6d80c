"""Reward models: frozen open_clip models that score images against their prompts.

Two rewards ship, both open_clip CLIP models loaded from a local file:

- ``clip``: DFN5B-CLIP-ViT-H-14 (``Apple_CLIP-H-14-224.bin``), a plain open_clip state dict;
- ``hps``: HPSv2.1 (``HPS_v2.1_compressed.pt``), the same kind of state dict under ``"state_dict"``.

A score is the cosine of the L2-normalised image features and the features of *that image's own*
prompt (no logit scale), as HPSv2 scores; "HPS 29.5" in papers is that cosine x 100. Images are
preprocessed in torch (resize to the model's size, bicubic and antialiased, OpenAI CLIP mean/std),
so scores are differentiable with respect to the images.

Nothing here reaches the network: architectures come from open_clip's bundled configs or a local
JSON file, and text goes through open_clip's bundled BPE tokenizer (the one the reference fetched
from the hub as laion/CLIP-ViT-H-14-laion2B-s32B-b79K).

Fixed reference defect: DFN5B-CLIP-ViT-H-14 was trained with QuickGELU (open_clip registers its
``dfn5b`` weights under ``ViT-H-14-quickgelu``), but the reference built it as ``ViT-H-14`` (GELU).
The activation has no weights, so a strict load cannot notice. The ``clip`` reward therefore
defaults to ``ViT-H-14-quickgelu``; pass ``ViT-H-14`` as its arch to reproduce the reference.
"""

from __future__ import annotations

import copy
import json
import os
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from dmdr.dmd.losses import reward_hinge
from dmdr.errors import UserError
from dmdr.reward_kinds import KINDS, RewardKind  # noqa: F401 (re-exported)

#: Scores below this margin are pushed up by the reward loss ``relu(margin - score)``.
HINGE_MARGIN = 0.7

#: OpenAI CLIP normalisation, used unless a model-config JSON brings its own ``preprocess_cfg``.
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class RewardSpec:
    """One reward model to load.

    name: "clip" or "hps" (a key of ``KINDS``).
    path: local checkpoint file.
    arch: open_clip model name or path to an open_clip model-config JSON; None means the
        reward's default (clip: ViT-H-14-quickgelu, hps: ViT-H-14).
    weight: weight of this reward's hinge loss; 0 scores it (for logs) without gradients.
    prefix: text put before every prompt, joined with a space (HPS: ``--magic-prompt``).
    """

    name: str
    path: str
    arch: str | None = None
    weight: float = 0.0
    prefix: str | None = None

    def __post_init__(self) -> None:
        if self.name not in KINDS:
            raise UserError(f"Unknown reward model {self.name!r}: use one of {sorted(KINDS)}.")

    @property
    def kind(self) -> RewardKind:
        return KINDS[self.name]

    @property
    def arch_or_default(self) -> str:
        return self.arch or self.kind.default_arch


# --------------------------------------------------------------------------------------------
# Architectures
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Arch:
    """A resolved open_clip architecture: the model config and the image normalisation."""

    name: str
    model_cfg: dict
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD

    @property
    def image_size(self) -> tuple[int, int]:
        size = self.model_cfg["vision_cfg"].get("image_size", 224)
        return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))

    @property
    def context_length(self) -> int:
        return int(self.model_cfg["text_cfg"].get("context_length", 77))


def resolve_arch(arch: str, kind: RewardKind | None = None) -> Arch:
    """Turn an open_clip model name or a model-config JSON path into an `Arch`, offline."""
    import open_clip

    flag = kind.arch_flag if kind else "the reward architecture"
    if arch.startswith(("hf-hub:", "local-dir:")):
        raise UserError(
            f"{flag} {arch!r}: hub and local-dir schemas are not supported (nothing is fetched "
            "at run time); pass an open_clip model name such as ViT-H-14 or a model-config JSON."
        )
    mean, std = OPENAI_MEAN, OPENAI_STD
    if arch.endswith(".json") or os.path.isfile(arch):
        try:
            raw = json.loads(Path(arch).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise UserError(f"{flag} {arch}: cannot read the model-config JSON ({e}).") from e
        cfg = raw.get("model_cfg", raw) if isinstance(raw, dict) else None
        pre = raw.get("preprocess_cfg", {}) if isinstance(raw, dict) else {}
        mean = tuple(pre.get("mean", mean))
        std = tuple(pre.get("std", std))
    else:
        cfg = open_clip.get_model_config(arch)
        if cfg is None:
            raise UserError(
                f"{flag} {arch!r} is neither an open_clip model name (e.g. ViT-H-14, "
                "ViT-H-14-quickgelu) nor an existing model-config JSON file."
            )
    if not isinstance(cfg, dict) or not {"embed_dim", "vision_cfg", "text_cfg"} <= cfg.keys():
        raise UserError(
            f"{flag} {arch}: not an open_clip model config (it needs embed_dim, vision_cfg "
            "and text_cfg, as in open_clip's model_configs/*.json)."
        )
    if "hf_model_name" in cfg["text_cfg"] or "multimodal_cfg" in cfg:
        raise UserError(
            f"{flag} {arch}: Hugging Face text towers and CoCa models are not supported as "
            "rewards; use a CLIP config with an open_clip text tower."
        )
    return Arch(arch, copy.deepcopy(cfg), mean, std)


def build_model(arch: Arch, device: torch.device | str | None = None) -> torch.nn.Module:
    """Instantiate the open_clip model of ``arch`` (random weights) on ``device`` (or 'meta')."""
    from open_clip.model import CLIP, CustomTextCLIP

    cfg = copy.deepcopy(arch.model_cfg)
    custom_text = cfg.pop("custom_text", False)
    if "timm_model_name" in cfg["vision_cfg"]:
        cfg["vision_cfg"]["timm_model_pretrained"] = False  # never download timm weights
    cls = CustomTextCLIP if custom_text else CLIP
    with torch.device(device or "cpu"):
        return cls(**cfg)


# --------------------------------------------------------------------------------------------
# Checkpoint files
# --------------------------------------------------------------------------------------------


def _describe(spec: RewardSpec) -> str:
    k = spec.kind
    return f"{k.flag} {spec.path} (expected {k.file_name}, the {k.label})"


def _check_path(spec: RewardSpec) -> None:
    path = Path(spec.path)
    if not path.exists():
        raise UserError(f"{_describe(spec)}: file not found; fix the path or download the file.")
    if not path.is_file():
        raise UserError(f"{_describe(spec)}: not a file.")
    if not os.access(path, os.R_OK):
        raise UserError(f"{_describe(spec)}: not readable; check the file's permissions.")
    if path.stat().st_size == 0:
        raise UserError(f"{_describe(spec)}: the file is empty; download it again.")


def _sniff(spec: RewardSpec) -> bool:
    """Look at the file's first bytes: True for a torch.save zip, False for a legacy pickle."""
    if zipfile.is_zipfile(spec.path):
        return True
    with open(spec.path, "rb") as f:
        head = f.read(4)
    if head.startswith(b"PK"):
        raise UserError(
            f"{_describe(spec)}: an incomplete zip archive (truncated download?); "
            "download the file again."
        )
    if head[:1] != b"\x80":  # pickle protocol marker of legacy torch.save files
        raise UserError(
            f"{_describe(spec)}: not a PyTorch checkpoint (neither a torch.save zip archive "
            "nor a pickle); download the file again."
        )
    return False


def _read_checkpoint(spec: RewardSpec, is_zip: bool) -> object:
    """torch.load the file on CPU (memory-mapped when it is a zip checkpoint), tensors only."""
    try:
        return torch.load(spec.path, map_location="cpu", weights_only=True, mmap=is_zip)
    except Exception as e:  # any failure to read the file is a problem with the file
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"{_describe(spec)}: not a readable PyTorch checkpoint (truncated or another "
            f"format?): {reason[:200]}"
        ) from e


def _is_tensor_dict(obj: object) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()
    )


def _extract_state_dict(spec: RewardSpec, obj: object) -> dict[str, Tensor]:
    """The model weights of a checkpoint in the reward's format, or a UserError."""
    nested = isinstance(obj, dict) and "state_dict" in obj
    if spec.kind.nested and not nested:
        other = " (it looks like a plain CLIP state dict: pass it with --clip-reward-model)"
        raise UserError(
            f"{_describe(spec)}: expected a checkpoint with the weights under 'state_dict' "
            f"(the HPSv2 format){other if _is_tensor_dict(obj) else ''}."
        )
    if not spec.kind.nested and nested:
        raise UserError(
            f"{_describe(spec)}: expected a plain open_clip state dict, but the weights are "
            "under 'state_dict' (the HPSv2 format: pass it with --hpsv2-reward-model)."
        )
    state = obj["state_dict"] if nested else obj
    if not _is_tensor_dict(state):
        raise UserError(f"{_describe(spec)}: holds no state dict of named tensors.")
    if all(k.startswith("module.") for k in state):  # saved from a DDP-wrapped model
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _mismatch(expected: dict[str, torch.Size], state: dict[str, Tensor]) -> str | None:
    """A one-line summary of how ``state`` differs from the model's keys and shapes."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(s)}"
        for k, s in expected.items()
        if k in state and state[k].shape != s
    ]
    parts = [
        f"{len(items)} {what} (e.g. {items[0]})"
        for what, items in (
            ("missing keys", missing), ("unexpected keys", unexpected),
            ("shape mismatches file vs model", shapes),
        )
        if items
    ]
    return "; ".join(parts) or None


def _load_state_dict(spec: RewardSpec, arch: Arch) -> tuple[torch.nn.Module, dict[str, Tensor]]:
    """Check the file and return (model skeleton on 'meta', the file's state dict)."""
    _check_path(spec)
    state = _extract_state_dict(spec, _read_checkpoint(spec, _sniff(spec)))
    skeleton = build_model(arch, "meta")
    expected = {k: v.shape for k, v in skeleton.state_dict().items()}
    problem = _mismatch(expected, state)
    if problem:
        raise UserError(
            f"{_describe(spec)}: does not fit architecture {arch.name}: {problem}. Check that "
            f"it is the right file and that {spec.kind.arch_flag} names its architecture."
        )
    return skeleton, state


def check_reward_file(spec: RewardSpec) -> None:
    """Validate a reward checkpoint cheaply, before training starts; raise UserError if bad.

    Checks the path (exists, readable, non-empty), that it is a readable PyTorch checkpoint in
    the reward's format, and that its keys and shapes fit the architecture. Zip checkpoints
    (what torch.save writes) are memory-mapped, so no weights are read; an old-style (pre-zip)
    file only has its first byte checked here and is fully checked by `load_reward`.
    """
    arch = resolve_arch(spec.arch_or_default, spec.kind)
    _check_path(spec)
    if _sniff(spec):
        _load_state_dict(spec, arch)


def _materialise(model: torch.nn.Module) -> bool:
    """Fill buffers left on 'meta' after an assign-load; False if one cannot be rebuilt.

    open_clip's only non-persistent buffers in CLIP models are the text tower's causal
    attention masks (-inf above the diagonal), which are rebuilt here.
    """
    for module in model.modules():
        for name, buf in list(module.named_buffers(recurse=False)):
            if not buf.is_meta:
                continue
            if name != "attn_mask" or buf.dim() != 2:
                return False
            mask = torch.full(tuple(buf.shape), float("-inf")).triu_(1)
            module.register_buffer(name, mask, persistent=False)
    return not any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))


def load_reward(
    spec: RewardSpec,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> RewardModel:
    """Load one reward model strictly from its local file: frozen, eval, on ``device``/``dtype``.

    Raises UserError naming the file and what was expected when it is missing, unreadable,
    in the other reward's format or made for another architecture.
    """
    arch = resolve_arch(spec.arch_or_default, spec.kind)
    model, state = _load_state_dict(spec, arch)
    # Assign the (memory-mapped) tensors instead of initialising random weights first: that
    # saves the random init and a second copy of the weights in host memory.
    model.load_state_dict(state, strict=True, assign=True)
    if not _materialise(model):
        model = build_model(arch, "cpu")
        model.load_state_dict(state, strict=True)
    model.to(device=device, dtype=dtype)
    return RewardModel(spec.name, model, arch, prefix=spec.prefix)


# --------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------


@lru_cache(maxsize=4)
def _tokenizer(context_length: int):
    """open_clip's bundled BPE tokenizer (vocab shipped in the wheel; never the hub)."""
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer(context_length=context_length)


class RewardModel(torch.nn.Module):
    """A frozen open_clip model scoring images against their prompts. Stays in eval mode.

    Never wrap it in DDP/FSDP: it has no trainable parameters.
    """

    def __init__(self, name: str, model: torch.nn.Module, arch: Arch, prefix: str | None = None):
        super().__init__()
        self.name = name
        self.arch = arch
        self.prefix = prefix
        self.model = model.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> RewardModel:
        """Ignore train(): dropout or norm statistics must never change the reward."""
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def preprocess(self, images: Tensor) -> Tensor:
        """[B,3,H,W] in [0,1] -> model input: resized (bicubic, antialiased), normalised."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B,3,H,W] in [0,1], got {tuple(images.shape)}")
        x = images.to(device=self.device, dtype=torch.float32)
        size = self.arch.image_size
        if tuple(x.shape[-2:]) != size:
            x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True)
        mean = torch.tensor(self.arch.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.arch.std, device=x.device).view(1, 3, 1, 1)
        return ((x - mean) / std).to(self.dtype)

    def tokenize(self, prompts: list[str]) -> Tensor:
        """Token ids [B, context_length] of the (prefixed) prompts, on the model's device."""
        if self.prefix:
            prompts = [f"{self.prefix} {p}" for p in prompts]
        return _tokenizer(self.arch.context_length)(list(prompts)).to(self.device)

    def text_features(self, prompts: list[str]) -> Tensor:
        """L2-normalised text features [B, D] in float32 (no gradients: prompts are data)."""
        with torch.no_grad():
            return F.normalize(self.model.encode_text(self.tokenize(prompts)).float(), dim=-1)

    def image_features(self, images: Tensor) -> Tensor:
        """L2-normalised image features [B, D] in float32, differentiable in ``images``."""
        return F.normalize(self.model.encode_image(self.preprocess(images)).float(), dim=-1)

    def score(self, images: Tensor, prompts: list[str]) -> Tensor:
        """Cosine of each image with its own prompt: [B] float32, differentiable in ``images``."""
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(prompts)} prompts")
        return (self.image_features(images) * self.text_features(prompts)).sum(dim=-1)

    def forward(self, images: Tensor, prompts: list[str]) -> Tensor:
        return self.score(images, prompts)


class RewardSet:
    """The reward models of a run: loaded lazily, moved to the GPU only when needed.

    Not an ``nn.Module`` on purpose, so its models never end up in a trainer's state dict,
    optimiser or DDP/FSDP wrapper.
    """

    def __init__(self, specs: list[RewardSpec], dtype: torch.dtype = torch.float32):
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise UserError(f"Each reward model can be given once, got {names}.")
        self.specs = list(specs)
        self.dtype = dtype
        self._device: torch.device | None = None
        self._models: dict[str, RewardModel] | None = None

    @classmethod
    def from_models(cls, specs: list[RewardSpec], models: dict[str, RewardModel],
                    device: torch.device | str, dtype: torch.dtype) -> RewardSet:
        """A set over models already built (benchmarks with random weights; tests)."""
        if sorted(models) != sorted(s.name for s in specs):
            raise ValueError(f"models {sorted(models)} do not match the specs {[s.name for s in specs]}")
        out = cls(specs, dtype)
        out._device, out._models = torch.device(device), dict(models)
        return out

    def __len__(self) -> int:
        return len(self.specs)

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.specs]

    @property
    def loaded(self) -> bool:
        return self._models is not None

    def check(self) -> None:
        """Validate every checkpoint file cheaply (see `check_reward_file`)."""
        for spec in self.specs:
            check_reward_file(spec)

    def load(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> RewardSet:
        """Load all models now, on ``device`` (default: the last `to` device, else CPU)."""
        if device is not None:
            self._device = torch.device(device)
        if dtype is not None:
            self.dtype = dtype
        target = self._device or torch.device("cpu")
        self._models = {s.name: load_reward(s, target, self.dtype) for s in self.specs}
        return self

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> RewardSet:
        """Move (and cast) the models; if not loaded yet, set where they will be loaded.

        Cheap when nothing changes, so it can be called every step of the reward phase.
        """
        device, dtype = torch.device(device), dtype or self.dtype
        if device == self._device and dtype == self.dtype:
            return self
        self._device, self.dtype = device, dtype
        for model in (self._models or {}).values():
            model.to(device=device, dtype=dtype)
        return self

    @property
    def models(self) -> dict[str, RewardModel]:
        if self._models is None:
            self.load()
        return self._models

    def scores(self, images: Tensor, prompts: list[str]) -> dict[str, Tensor]:
        """name -> [B] float32 scores. Rewards with weight 0 are scored without gradients."""
        if self._models is None:
            self.load(self._device or images.device)
        out = {}
        for spec in self.specs:
            model = self._models[spec.name]
            if spec.weight:
                out[spec.name] = model.score(images, prompts)
            else:
                with torch.no_grad():
                    out[spec.name] = model.score(images, prompts)
        return out

    def loss(self, images: Tensor, prompts: list[str]) -> tuple[Tensor, dict[str, float]]:
        """``sum_i weight_i * mean(relu(0.7 - score_i))`` and ``{name: mean score}`` for logs."""
        total = torch.zeros((), device=images.device, dtype=torch.float32)
        logs = {}
        weights = {s.name: s.weight for s in self.specs}
        for name, score in self.scores(images, prompts).items():
            weight = weights[name]
            if weight:
                total = total + weight * reward_hinge(score, HINGE_MARGIN).to(total.device)
            logs[name] = float(score.detach().mean())
        return total, logs
