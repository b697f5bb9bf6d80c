"""`--format lora`: the generator as a LoRA on the SDXL base, for diffusers and for A1111/ComfyUI.

The folder holds
    pytorch_lora_weights.safetensors   diffusers' format (`pipe.load_lora_weights(folder)`), written by
                                       `save_lora_weights` from peft's own state dict
                                       (keys `unet.<module>.lora_A/B.weight`; not `convert_state_dict_to_diffusers`,
                                       whose legacy attention keys diffusers 0.42.1's loader drops)
    <folder name>_kohya.safetensors    the kohya key format (`lora_unet_<module>.lora_down/lora_up.weight`, `.alpha`)
                                       that A1111 and ComfyUI read, converted by `convert_state_dict_to_kohya`
    dmdr_export.json                   the sampling timesteps, the rank and, for an extracted LoRA, its error

The adapter's scale (lora_alpha / r: 2 for dmdr's generator LoRA) is folded into the B (up) matrices,
so both files say alpha = r and every loader applies the trained scale, whether it reads alpha or not.

`--use-lora-gen` runs export their adapter as trained. Full fine-tunes need `--extract-lora RANK`: for
every LoRA target module (the Linear and the Conv2d layers of LORA_TARGET_MODULES) the difference to the
teacher, delta = W_gen - W_teacher (a conv's flattened to out x in*kh*kw), is cut to its RANK largest
singular values (fp32 SVD): B = U sqrt(S), A = sqrt(S) Vh. At full rank it reproduces those modules;
what no LoRA carries (biases, norms, other layers) is reported beside the truncation error.
"""
from __future__ import annotations

import json
import math
import shutil
import tempfile
from pathlib import Path

import torch

from dmdr.errors import UserError
from dmdr.exports.diffusers_unet import merged_unet, replace_dir
from dmdr.models.sdxl import ADAPTER, EXPORT_INFO, LORA_TARGET_MODULES, has_lora, lora_config, unwrap

LAST = EXPORT_INFO  # a folder in the store is whole once its dmdr_export.json is there
DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"
KOHYA_SUFFIX = "_kohya.safetensors"


def check(cfg, extract_lora: int | None = None) -> None:
    """One clear error for a LoRA export this run cannot give (`export()` calls it before loading models)."""
    if extract_lora is not None and extract_lora < 1:
        raise UserError(f"--extract-lora {extract_lora}: the rank must be a positive integer")
    if cfg.use_lora_gen and extract_lora is not None and not cfg.xl_ode_pretrain_path:
        raise UserError("--extract-lora: this run trained a LoRA generator (--use-lora-gen); "
                        "export its LoRA as trained: drop --extract-lora")
    if cfg.use_lora_gen and extract_lora is None and cfg.xl_ode_pretrain_path:
        raise UserError(f"--format lora: this run's LoRA sits on the ODE init {cfg.xl_ode_pretrain_path}, not on "
                        "the SDXL base, so alone it is not the generator; add --extract-lora RANK (a LoRA of the "
                        "whole difference to the base)")
    if not cfg.use_lora_gen and extract_lora is None:
        raise UserError("--format lora: this run fine-tuned the full UNet (no --use-lora-gen); add --extract-lora "
                        "RANK to extract a LoRA of rank RANK from its difference to the base (e.g. 64)")


def adapter_weights(unet: torch.nn.Module) -> tuple[dict[str, torch.Tensor], int]:
    """The trained adapter in peft's key layout (`<module>.lora_A.weight`, ...), each B times its
    module's scale (lora_alpha / r), and the rank."""
    from peft import get_peft_model_state_dict
    from peft.tuners.lora import LoraLayer

    model = unwrap(unet)
    scale = {name: m.scaling[ADAPTER] for name, m in model.named_modules() if isinstance(m, LoraLayer)}
    state = get_peft_model_state_dict(model, adapter_name=ADAPTER)
    weights = {}
    for key, value in state.items():
        module, _, part = key.rpartition(".lora_")
        weights[key] = value.detach().float() * (scale[module] if part.startswith("B.") else 1.0)
    return weights, int(model.peft_config[ADAPTER].r)


def _targets(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The Linear and Conv2d modules a dmdr LoRA adapts (peft's suffix match on LORA_TARGET_MODULES)."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
            and any(name == t or name.endswith(f".{t}") for t in LORA_TARGET_MODULES)}


@torch.no_grad()
def extract(generator: torch.nn.Module, teacher: torch.nn.Module,
            rank: int) -> tuple[dict[str, torch.Tensor], int, dict]:
    """A rank-`rank` LoRA of generator - teacher on the target modules (truncated SVD in fp32).

    Returns the weights in peft's key layout (alpha = rank), the rank used (`rank`, capped at the
    largest rank any module has; smaller modules are zero-padded) and the error report: the Frobenius
    norms of the whole difference, of the dropped singular values and of what no LoRA carries.
    """
    gen = merged_unet(generator, torch.float32) if has_lora(generator) else unwrap(generator)
    teacher = unwrap(teacher)
    theirs = dict(teacher.named_modules())
    targets = _targets(gen)
    rank = min(rank, max(min(m.weight.shape[0], m.weight[0].numel()) for m in targets.values()))
    weights, dropped, delta_sq = {}, 0.0, 0.0
    svd_on = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # SDXL's 788 SVDs: long on a CPU
    for name, module in targets.items():
        w = module.weight.float()
        delta = (w - theirs[name].weight.float()).reshape(w.shape[0], -1)
        u, s, vh = (x.cpu() for x in torch.linalg.svd(delta.to(svd_on), full_matrices=False))
        keep = min(rank, s.numel())
        dropped += float(s[keep:].square().sum())
        delta_sq += float(s.square().sum())
        root = s[:keep].sqrt()
        down = torch.zeros(rank, delta.shape[1])
        up = torch.zeros(delta.shape[0], rank)
        down[:keep], up[:, :keep] = root[:, None] * vh[:keep], u[:, :keep] * root
        if w.ndim == 4:  # conv: A is a conv with the layer's kernel, B a 1x1 conv
            down, up = down.reshape(rank, *w.shape[1:]), up[:, :, None, None]
        weights[f"{name}.lora_A.weight"], weights[f"{name}.lora_B.weight"] = down, up
    carried = {f"{name}.weight" for name in targets}
    ours = teacher.state_dict()
    rest = sum(float((v.float() - ours[k].float()).square().sum())
               for k, v in gen.state_dict().items() if k not in carried)
    report = {"rank": rank, "delta_norm": math.sqrt(delta_sq + rest), "dropped_norm": math.sqrt(dropped),
              "not_carried_norm": math.sqrt(rest)}
    total = report["delta_norm"] or 1.0
    report["relative_error"] = math.sqrt(dropped + rest) / total
    return weights, rank, report


def _save(weights: dict[str, torch.Tensor], rank: int, build: Path, kohya_name: str, dtype: torch.dtype) -> None:
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_kohya
    from safetensors.torch import save_file

    cast = {k: v.to(dtype).contiguous() for k, v in weights.items()}
    StableDiffusionXLPipeline.save_lora_weights(
        build, unet_lora_layers=cast, weight_name=DIFFUSERS_FILE,
        unet_lora_adapter_metadata=lora_config(rank, rank).to_dict())  # alpha = r: the scale is in B
    kohya = convert_state_dict_to_kohya({f"unet.{k}": v for k, v in cast.items()})  # alpha: the rank
    save_file({k: v.contiguous() for k, v in kohya.items()}, str(build / kohya_name), metadata={"format": "pt"})


def write(source, out: Path, dtype: str, extract_lora: int | None = None) -> Path:
    """`--format lora` of an `ExportSource`: the adapter (or a LoRA extracted at rank `extract_lora`)
    in the diffusers and kohya formats, plus dmdr_export.json."""
    from dmdr.exports import base_model_name, torch_dtype

    cfg = source.cfg
    check(cfg, extract_lora)
    if extract_lora is None:
        weights, rank = adapter_weights(source.unet)
        extracted = None
    else:
        weights, rank, extracted = extract(source.unet, source.parts.unet, extract_lora)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    kohya_name = out.name + KOHYA_SUFFIX
    info = {
        "format": "dmdr-lora-export", "version": 1, "rank": rank, "lora_alpha": rank,
        "source": "adapter" if extracted is None else "extracted", "extraction": extracted,
        "base_model": base_model_name(cfg.pretrained_model), "files": {"diffusers": DIFFUSERS_FILE, "kohya": kohya_name},
        "conditioning_timestep": source.conditioning_timestep, "num_steps": cfg.sample_num_steps,
        "timesteps": source.timesteps, "prediction_type": "epsilon", "guidance_scale": 0,
        "dtype": str(torch_dtype(dtype)).removeprefix("torch."),
        "how_to_sample": (
            "pipe = StableDiffusionXLPipeline.from_pretrained(<SDXL base>); pipe.load_lora_weights(<this folder>); "
            "pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config); "
            "pipe(prompt, num_inference_steps=len(timesteps), timesteps=timesteps, guidance_scale=0). "
            f"A1111/ComfyUI: {kohya_name} at strength 1, guidance (CFG) 1, the same timesteps."
        ),
    }
    build = Path(tempfile.mkdtemp(prefix=f".{out.name}.build-", dir=out.parent))
    try:
        _save(weights, rank, build, kohya_name, torch_dtype(dtype))
        (build / EXPORT_INFO).write_text(json.dumps(info, indent=2) + "\n")
        replace_dir(build, out)
    finally:
        shutil.rmtree(build, ignore_errors=True)
    if extracted is not None:
        print(f"extracted LoRA rank {rank}: relative error {extracted['relative_error']:.3g} of the difference to "
              f"the base (dropped singular values {extracted['dropped_norm']:.3g}, not in any LoRA "
              f"{extracted['not_carried_norm']:.3g}, of {extracted['delta_norm']:.3g})", flush=True)
    return out
