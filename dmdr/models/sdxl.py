"""SDXL parts for DMDR: loading, text conditioning, UNet calls, LoRA, ODE init, decoding.

Everything here works on plain diffusers/transformers modules; functions that inspect a model
(`save_lora`, `lora_state_dict`, ...) accept it wrapped by DDP/accelerate/torch.compile too.
The real score is the guidance UNet called with LoRA scale 0 and the fake score the same UNet at
the fake LoRA scale: `tests/unit/test_lora_scale.py` guards that trick.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dmdr.errors import UserError
from dmdr.models.tiny import TINY_SPEC_VERSION, build_tiny_sdxl

#: Module-name suffixes that get LoRA, on the generator and on the guidance (fake score) UNet.
LORA_TARGET_MODULES = [
    "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
    "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj",
]

ADAPTER = "default"  # each UNet carries a single adapter under peft's default name
LORA_WEIGHTS = "adapter_model.safetensors"
LORA_CONFIG = "adapter_config.json"
EXPORT_INFO = "dmdr_export.json"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Only the diffusers-format fp32 weights and configs of a hub SDXL repository are needed.
_HUB_PATTERNS = [
    "model_index.json", "*/config.json", "*/*_config.json", "*/*.txt", "*/vocab.json",
    "*/tokenizer.json", "*/special_tokens_map.json", "*/model.safetensors",
    "*/diffusion_pytorch_model.safetensors", "*/*.safetensors.index.json",
    "*/model-*.safetensors", "*/diffusion_pytorch_model-*.safetensors",
]

#: URI scheme -> resolver(spec, cache_dir) -> local folder. The storage module registers "s3".
PRETRAINED_RESOLVERS: dict[str, Callable[[str, Path], Path]] = {}


# ----------------------------------------------------------------------------- locating weights
def register_pretrained_resolver(scheme: str, resolver: Callable[[str, Path], Path]) -> None:
    """Let `resolve_pretrained` accept `<scheme>://...` specs (e.g. "s3" from dmdr.storage)."""
    PRETRAINED_RESOLVERS[scheme] = resolver


def _check_diffusers_folder(path: Path) -> Path:
    if not (path / "model_index.json").is_file():
        raise UserError(
            f"pretrained model folder {path} has no model_index.json; expected a diffusers SDXL "
            "folder (model_index.json, unet/, vae/, text_encoder/, text_encoder_2/, tokenizer/, "
            "tokenizer_2/, scheduler/), e.g. a snapshot of stabilityai/stable-diffusion-xl-base-1.0"
        )
    return path


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


_DISTRIBUTED_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                    "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")


def _build_tiny(path: Path) -> Path:
    """Build the tiny pipeline; inside a distributed job (RANK set) in a clean subprocess, because
    transformers' save_pretrained writes nothing on a process whose global rank is not 0."""
    if "RANK" not in os.environ or os.environ.get("RANK") == "0":
        return build_tiny_sdxl(path)
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in _DISTRIBUTED_ENV}
    code = "import sys; from dmdr.models.tiny import build_tiny_sdxl; build_tiny_sdxl(sys.argv[1])"
    subprocess.run([sys.executable, "-c", code, str(path)], env=env, check=True)
    return build_tiny_sdxl(path)  # now complete: returns at once


def resolve_pretrained(spec: str, cache_dir: Path) -> Path:
    """Turn `--pretrained-model` into a local diffusers SDXL folder.

    `builtin:tiny` builds the tiny random pipeline under `cache_dir`; an existing folder is used
    as is; `<scheme>://...` goes to a registered resolver; a hub id ("org/name") is downloaded
    only when HF_HUB_OFFLINE is not set.
    """
    cache_dir = Path(cache_dir)
    if spec == "builtin:tiny":
        return _build_tiny(cache_dir / f"tiny-sdxl-v{TINY_SPEC_VERSION}")
    scheme, sep, _ = spec.partition("://")
    if sep:
        if scheme not in PRETRAINED_RESOLVERS:
            raise UserError(
                f"pretrained model {spec}: no resolver for {scheme}:// URIs is registered; "
                "use a local diffusers SDXL folder or a hub id"
            )
        return _check_diffusers_folder(Path(PRETRAINED_RESOLVERS[scheme](spec, cache_dir)))
    local = Path(spec).expanduser()
    if local.exists():
        return _check_diffusers_folder(local)
    fix = ("pass --pretrained-model with a local diffusers SDXL folder (`dmdr weights fetch --groups sdxl-base`), "
           "or try the pipeline with --preset tiny (a built-in tiny model)")
    if not _HUB_ID.match(spec) or _hub_offline():
        why = "HF_HUB_OFFLINE is set" if _HUB_ID.match(spec) else "it is neither a folder nor a hub id"
        raise UserError(f"--pretrained-model {spec}: not a local folder, and {why}; {fix}")
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(repo_id=spec, cache_dir=cache_dir / "hub", allow_patterns=_HUB_PATTERNS)
    except Exception as exc:  # offline, unknown repo, gated: the hub client raises many types
        raise UserError(f"--pretrained-model {spec}: not a local folder, and the download from the Hugging Face "
                        f"Hub failed ({type(exc).__name__}: no network, or a gated/unknown repo); {fix}") from None
    return _check_diffusers_folder(Path(folder))


# ----------------------------------------------------------------------------- loading
@dataclass
class SDXLParts:
    """The frozen SDXL parts DMDR needs, in eval mode, fp32, on the CPU as loaded."""

    tokenizer_one: Any  # CLIPTokenizer, pads/truncates to 77
    tokenizer_two: Any  # CLIPTokenizer of text_encoder_two
    text_encoder_one: torch.nn.Module  # CLIPTextModel
    text_encoder_two: torch.nn.Module  # CLIPTextModelWithProjection (pooled = text_embeds)
    unet: torch.nn.Module  # the teacher UNet2DConditionModel as loaded
    vae: torch.nn.Module  # AutoencoderTiny (vae_kind "tiny") or AutoencoderKL ("full")
    vae_kind: str  # "tiny" | "full"
    alphas_cumprod: Tensor  # float32 [num_train_timesteps] from the scheduler config
    scheduler_config: dict  # the pipeline's scheduler config


def _load_part(cls: Any, path: Path | str, subfolder: str | None, **kwargs: Any) -> Any:
    where = Path(path) / subfolder if subfolder else Path(path)
    try:
        if subfolder:
            return cls.from_pretrained(path, subfolder=subfolder, **kwargs)
        return cls.from_pretrained(path, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(
            f"could not load {cls.__name__} from {where} ({type(exc).__name__}: {exc}); "
            "expected a complete diffusers SDXL folder there"
        ) from exc


def _tiny_vae_folder(path: Path, tiny_vae_path: str | None) -> Path:
    if tiny_vae_path:
        folder = Path(tiny_vae_path).expanduser()
        if not (folder / "config.json").is_file():
            raise UserError(
                f"--tiny-vae-path {folder} is not an AutoencoderTiny folder (config.json + "
                "diffusion_pytorch_model.safetensors, like madebyollin/taesdxl)"
            )
        return folder
    candidates = [path / "vae_tiny"]
    if os.environ.get("DMDR_WEIGHTS_DIR"):
        candidates.append(Path(os.environ["DMDR_WEIGHTS_DIR"]) / "taesdxl")
    for folder in candidates:
        if (folder / "config.json").is_file():
            return folder
    raise UserError(
        f"no tiny VAE found (looked in {', '.join(map(str, candidates))}); pass --tiny-vae-path "
        "pointing at a madebyollin/taesdxl folder, or use --vae full"
    )


def load_sdxl(path: Path, *, vae: str = "tiny", tiny_vae_path: str | None = None) -> SDXLParts:
    """Load the SDXL parts from a local diffusers folder (never the hub); all frozen, eval mode."""
    from diffusers import AutoencoderKL, AutoencoderTiny, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    path = _check_diffusers_folder(Path(path))
    if vae not in ("tiny", "full"):
        raise UserError(f"--vae {vae!r} is not one of 'tiny', 'full'")
    if vae == "tiny":
        vae_model = _load_part(AutoencoderTiny, _tiny_vae_folder(path, tiny_vae_path), None)
    else:
        vae_model = _load_part(AutoencoderKL, path, "vae")
    scheduler_config = dict(DDPMScheduler.load_config(path, subfolder="scheduler"))
    alphas = DDPMScheduler.from_config(scheduler_config).alphas_cumprod.to(torch.float32)
    parts = SDXLParts(
        tokenizer_one=_load_part(CLIPTokenizer, path, "tokenizer"),
        tokenizer_two=_load_part(CLIPTokenizer, path, "tokenizer_2"),
        text_encoder_one=_load_part(CLIPTextModel, path, "text_encoder"),
        text_encoder_two=_load_part(CLIPTextModelWithProjection, path, "text_encoder_2"),
        unet=_load_part(UNet2DConditionModel, path, "unet"),
        vae=vae_model,
        vae_kind=vae,
        alphas_cumprod=alphas,
        scheduler_config=scheduler_config,
    )
    for module in (parts.text_encoder_one, parts.text_encoder_two, parts.unet, parts.vae):
        module.requires_grad_(False)
        module.eval()
    return parts


# ----------------------------------------------------------------------------- conditioning
@torch.no_grad()
def encode_prompts(parts: SDXLParts, prompts: list[str], device: torch.device | str) -> tuple[Tensor, Tensor]:
    """SDXL text conditioning: ([B, 77, hidden_one + hidden_two], pooled [B, proj_dim]).

    Both encoders contribute their penultimate hidden states; the pooled embedding is
    text_encoder_two's projected output. Returned on `device`, in the encoders' dtype.
    """
    hidden, pooled = [], None
    for tokenizer, encoder in (
        (parts.tokenizer_one, parts.text_encoder_one),
        (parts.tokenizer_two, parts.text_encoder_two),
    ):
        ids = tokenizer(
            list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
            truncation=True, return_tensors="pt",
        ).input_ids.to(next(encoder.parameters()).device)
        out = encoder(ids, output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        pooled = getattr(out, "text_embeds", None)
    return torch.cat(hidden, dim=-1).to(device), pooled.to(device)


def time_ids(resolution: int, batch: int, device: torch.device | str, dtype: torch.dtype) -> Tensor:
    """SDXL micro-conditioning [B, 6]: original size, crop (0, 0), target size."""
    row = torch.tensor([resolution, resolution, 0, 0, resolution, resolution], dtype=dtype, device=device)
    return row.unsqueeze(0).repeat(batch, 1)


def predict_eps(
    unet: torch.nn.Module,
    x_t: Tensor,
    t: Tensor | int,
    prompt_embeds: Tensor,
    pooled: Tensor,
    resolution: int,
    *,
    lora_scale: float | None = None,
    uncond: tuple[Tensor, Tensor] | None = None,
    cfg: float = 1.0,
) -> Tensor:
    """One UNet call returning epsilon in x_t's dtype.

    With cfg > 1 the unconditional (embeds, pooled) pair, broadcast to the batch, and the
    conditional half run in one batched call: eps = eps_u + cfg * (eps_c - eps_u).
    `lora_scale` goes through `cross_attention_kwargs={"scale": s}` (0 = the base UNet).
    """
    batch = x_t.shape[0]
    dtype = next(unet.parameters()).dtype
    timesteps = torch.as_tensor(t, device=x_t.device)
    if timesteps.ndim == 0:
        timesteps = timesteps.expand(batch)
    embeds, pooled_in = prompt_embeds, pooled
    guided = cfg > 1.0
    if guided:
        if uncond is None:
            raise ValueError("predict_eps: cfg > 1 needs the unconditional embeddings (uncond=...)")
        u_embeds, u_pooled = uncond
        embeds = torch.cat([u_embeds.expand(batch, -1, -1).to(embeds.device), embeds])
        pooled_in = torch.cat([u_pooled.expand(batch, -1).to(pooled.device), pooled])
        x_in, t_in = torch.cat([x_t, x_t]), torch.cat([timesteps, timesteps])
    else:
        x_in, t_in = x_t, timesteps
    n = x_in.shape[0]
    out = unet(
        x_in.to(dtype),
        t_in,
        encoder_hidden_states=embeds.to(dtype),
        added_cond_kwargs={
            "text_embeds": pooled_in.to(dtype),
            "time_ids": time_ids(resolution, n, x_t.device, dtype),
        },
        cross_attention_kwargs=None if lora_scale is None else {"scale": float(lora_scale)},
        return_dict=False,
    )[0]
    if guided:
        eps_u, eps_c = out.chunk(2)
        out = eps_u + cfg * (eps_c - eps_u)
    return out.to(x_t.dtype)


# ----------------------------------------------------------------------------- LoRA
def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain diffusers model under DDP / DeepSpeed / accelerate / torch.compile wrappers."""
    from diffusers import ModelMixin

    while not isinstance(model, ModelMixin):
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif hasattr(model, "module"):
            model = model.module
        else:
            break
    return model


def lora_config(rank: int, alpha: int) -> Any:
    """The peft LoraConfig of dmdr's UNet adapters (gaussian init, LORA_TARGET_MODULES)."""
    from peft import LoraConfig

    return LoraConfig(
        r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(LORA_TARGET_MODULES)
    )


def _add_lora(unet: torch.nn.Module, rank: int, alpha: int) -> None:
    model = unwrap(unet)
    model.requires_grad_(False)
    model.add_adapter(lora_config(rank, alpha), adapter_name=ADAPTER)
    for name, param in model.named_parameters():
        param.requires_grad_(".lora_" in name)


def add_guidance_lora(unet: torch.nn.Module, rank: int) -> None:
    """LoRA (r=alpha=rank, gaussian A, zero B) on the guidance UNet; only LoRA params train."""
    _add_lora(unet, rank, rank)


def add_generator_lora(unet: torch.nn.Module, rank: int, alpha: int) -> None:
    """LoRA on the generator (the caller passes rank=2*lora_rank, alpha=4*lora_rank)."""
    _add_lora(unet, rank, alpha)


def has_lora(unet: torch.nn.Module) -> bool:
    """Whether the (possibly wrapped) UNet carries a peft adapter."""
    return bool(getattr(unwrap(unet), "peft_config", None))


def _lora_params(unet: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    marker = f".{ADAPTER}."
    return {
        name.replace(marker, "."): param
        for name, param in unwrap(unet).named_parameters()
        if ".lora_" in name
    }


def lora_state_dict(unet: torch.nn.Module) -> dict[str, Tensor]:
    """The adapter weights, keyed by module path without the adapter name (peft's layout)."""
    return {name: param.detach() for name, param in _lora_params(unet).items()}


def lora_meta(unet: torch.nn.Module) -> dict:
    """The adapter's settings as dmdr writes them to adapter_config.json."""
    config = unwrap(unet).peft_config[ADAPTER]
    return {
        "r": int(config.r),
        "lora_alpha": int(config.lora_alpha),
        "target_modules": sorted(config.target_modules),
        "init_lora_weights": config.init_lora_weights,
        "peft_type": "LORA",
    }


def save_lora(unet: torch.nn.Module, directory: str | Path, state: dict[str, Tensor] | None = None) -> Path:
    """Write the adapter (adapter_model.safetensors + adapter_config.json) into `directory`.
    `state`: the weights by parameter name when `unet`'s own are sharded (FSDP's gathered state dict)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if state is None:
        state = lora_state_dict(unet)
    else:
        state = {k.replace(f".{ADAPTER}.", "."): v for k, v in state.items() if ".lora_" in k}
    tensors = {k: v.to("cpu").contiguous() for k, v in state.items()}
    for name, write in (
        (LORA_WEIGHTS, lambda p: save_file(tensors, str(p), metadata={"format": "pt"})),
        (LORA_CONFIG, lambda p: p.write_text(json.dumps(lora_meta(unet), indent=2) + "\n")),
    ):
        tmp = directory / f".{name}.tmp"
        write(tmp)
        os.replace(tmp, directory / name)
    return directory


def load_lora(unet: torch.nn.Module, directory: str | Path) -> None:
    """Load an adapter saved by `save_lora`, strictly; adds the adapter first if the UNet has none."""
    from safetensors.torch import load_file

    directory = Path(directory)
    try:
        meta = json.loads((directory / LORA_CONFIG).read_text())
        saved = load_file(str(directory / LORA_WEIGHTS))
    except (OSError, ValueError) as exc:
        raise UserError(
            f"LoRA folder {directory} is missing or unreadable ({exc}); expected {LORA_WEIGHTS} "
            f"and {LORA_CONFIG} written by dmdr"
        ) from exc
    if not has_lora(unet):
        _add_lora(unet, int(meta["r"]), int(meta["lora_alpha"]))
    ours = lora_meta(unet)
    for key in ("r", "lora_alpha", "target_modules"):
        if meta.get(key) != ours[key]:
            raise UserError(
                f"LoRA in {directory} has {key}={meta.get(key)} but this model's LoRA has "
                f"{key}={ours[key]}; resume with the same --lora-rank/--use-lora-gen settings"
            )
    params = _lora_params(unet)
    missing, unexpected, bad_shape = _mismatch(params, saved)
    if missing or unexpected or bad_shape:
        raise UserError(
            f"LoRA in {directory} does not fit this UNet: missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}, wrong shape {bad_shape[:3]}; it was saved for another model config"
        )
    with torch.no_grad():
        for key, param in params.items():
            param.copy_(saved[key].to(device=param.device, dtype=param.dtype))


def _mismatch(ours: dict[str, Tensor], theirs: dict[str, Tensor]) -> tuple[list[str], list[str], list[str]]:
    """Keys missing from `theirs`, keys only in `theirs`, and shared keys of another shape."""
    missing, unexpected = sorted(ours.keys() - theirs.keys()), sorted(theirs.keys() - ours.keys())
    bad_shape = sorted(k for k in ours.keys() & theirs.keys() if ours[k].shape != theirs[k].shape)
    return missing, unexpected, bad_shape


# ----------------------------------------------------------------------------- ODE init
def _read_state_dict(path: Path) -> dict[str, Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # legacy (non-zip) format cannot be memory-mapped
        return torch.load(path, map_location="cpu", weights_only=True)


def load_ode_init(unet: torch.nn.Module, path: str) -> None:
    """Load the one-step ODE-regression init (a raw UNet state_dict, .bin or .safetensors), strictly.

    Call it before adding a LoRA to the UNet.
    """
    file = Path(path).expanduser()
    expected = "a raw diffusers UNet state_dict for this UNet config (.bin or .safetensors)"
    if not file.is_file():
        raise UserError(f"ODE init file {file} does not exist; expected {expected}")
    try:
        state = _read_state_dict(file)
    except Exception as exc:  # any unreadable/unsafe pickle or corrupt safetensors
        raise UserError(
            f"ODE init file {file} could not be read ({type(exc).__name__}: {exc}); expected {expected}"
        ) from exc
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise UserError(f"ODE init file {file} does not hold a flat tensor dict; expected {expected}")
    model = unwrap(unet)
    if has_lora(model):
        raise ValueError("load_ode_init must run before a LoRA is added to the UNet")
    missing, unexpected, bad_shape = _mismatch(model.state_dict(), state)
    if missing or unexpected or bad_shape:
        raise UserError(
            f"ODE init file {file} does not match the UNet: {len(missing)} missing keys {missing[:3]}, "
            f"{len(unexpected)} unexpected {unexpected[:3]}, {len(bad_shape)} wrong shapes "
            f"{bad_shape[:3]}; expected {expected}"
        )
    model.load_state_dict(state, strict=True)


# ----------------------------------------------------------------------------- decoding
def decode_to_images(vae: torch.nn.Module, latents: Tensor) -> Tensor:
    """Decode latents to images in [0, 1] (differentiable); AutoencoderTiny or AutoencoderKL."""
    config = unwrap(vae).config
    shift = getattr(config, "shift_factor", None) or 0.0
    z = latents.to(next(vae.parameters()).dtype) / config.scaling_factor + shift
    images = unwrap(vae).decode(z).sample
    return (images / 2 + 0.5).clamp(0, 1)
