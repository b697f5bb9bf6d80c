"""Diffusers/transformers SDXL state dicts -> the original single-file ("sgm") key layout.

That layout is the one of Stability AI's ``sd_xl_base_1.0.safetensors`` (their generative-models
code, package ``sgm``), which ComfyUI and A1111 load from ``models/checkpoints``:

    model.diffusion_model.*              the UNet (openaimodel.UNetModel numbering)
    first_stage_model.*                  the KL VAE (ldm encoder/decoder names)
    conditioner.embedders.0.transformer.*  CLIP ViT-L text encoder (transformers names, text_model.*)
    conditioner.embedders.1.model.*      OpenCLIP ViT-bigG text encoder (open_clip names)

The rules are written from the architectures, after reading (not copying) the reverse converters
and one forward one:
- diffusers ``scripts/convert_diffusers_to_original_sdxl.py`` and ``diffusers/loaders/single_file_utils.py``
  (``convert_ldm_unet_checkpoint``, ``convert_ldm_vae_checkpoint``, ``convert_open_clip_checkpoint``,
  ``CHECKPOINT_KEY_NAMES``), the loader ``from_single_file`` uses;
- kohya-ss/sd-scripts ``library/sdxl_model_util.py``, which loads sd_xl_base_1.0 key for key and
  keeps its two non-weight keys: ``conditioner.embedders.0.transformer.text_model.embeddings.position_ids``
  (int64, transformers no longer saves it) and ``conditioner.embedders.1.model.logit_scale``.

Block numbering is derived from the keys themselves (resnets per block, down/upsamplers), so the
tiny test model and full-size SDXL go through the same code. `tests/unit/test_single_file_export.py`
checks the full-size key set against what is public about sd_xl_base_1.0 (2515 tensors).
"""
from __future__ import annotations

import math
import re
from collections import defaultdict

import torch
from torch import Tensor

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
CLIP_G_PREFIX = "conditioner.embedders.1.model."
CLIP_L_POSITION_IDS = CLIP_L_PREFIX + "text_model.embeddings.position_ids"
CLIP_G_LOGIT_SCALE = CLIP_G_PREFIX + "logit_scale"
#: OpenCLIP's trained logit scale is clamped at ln(100); sd_xl_base_1.0 stores 4.6055 (fp16). Unused by generation.
LOGIT_SCALE = math.log(100.0)

_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_CLIP_G_LAYER = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
                 "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
_CLIP_G_TOP = {"text_model.embeddings.token_embedding.weight": "token_embedding.weight",
               "text_model.embeddings.position_embedding.weight": "positional_embedding",
               "text_model.final_layer_norm.weight": "ln_final.weight",
               "text_model.final_layer_norm.bias": "ln_final.bias"}
_BLOCK = re.compile(r"^(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)$")
_VAE_BLOCK = re.compile(r"^(down|up)_blocks\.(\d+)\.(?:resnets\.(\d+)|(?:down|up)samplers\.0)\.(.+)$")


def _rename(rest: str, table: dict[str, str], what: str) -> str:
    """`rest` with its leading module path renamed by `table` (longest match first)."""
    for old in sorted(table, key=len, reverse=True):
        if rest == old or rest.startswith(old + "."):
            return table[old] + rest[len(old):]
    raise KeyError(f"no original-layout name for {what} key part {rest!r}")


def _unet_block_names(keys) -> dict[tuple, str]:
    """(side, block, index) -> sgm prefix; (side, block, 'sample') -> the down/upsampler's prefix.

    sgm numbers input_blocks 1.. over every resnet (with its attention) and every downsampler in
    order; output_blocks 0.. over every up resnet, the upsampler sitting in the block's last entry
    after the attention (slot 2) or, without one, after the resnet (slot 1).
    """
    resnets: dict[tuple, int] = defaultdict(int)
    samplers, attended = set(), set()
    for key in keys:
        m = _BLOCK.match(key)
        if not m:
            continue
        side, block, kind, index = m.group(1), int(m.group(2)), m.group(3), int(m.group(4))
        if kind == "resnets":
            resnets[(side, block)] = max(resnets[(side, block)], index + 1)
        elif kind == "attentions":
            attended.add((side, block))
        else:
            samplers.add((side, block))
    names: dict[tuple, str] = {}
    for side, first in (("down", 1), ("up", 0)):
        n = first
        for block in sorted(b for s, b in resnets if s == side):
            for j in range(resnets[(side, block)]):
                names[(side, block, j)] = f"{'input' if side == 'down' else 'output'}_blocks.{n}"
                n += 1
            if (side, block) in samplers and side == "down":
                names[(side, block, "sample")] = f"input_blocks.{n}.0.op"
                n += 1
            elif (side, block) in samplers:
                names[(side, block, "sample")] = f"output_blocks.{n - 1}.{2 if (side, block) in attended else 1}.conv"
    return names


def unet_to_sgm(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A diffusers UNet2DConditionModel state dict with sgm UNetModel names (no prefix)."""
    names = _unet_block_names(state)
    out = {}
    for key, value in state.items():
        m = _BLOCK.match(key)
        if m:
            side, block, kind, index, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
            if kind == "resnets":
                new = f"{names[(side, block, index)]}.0.{_rename(rest, _UNET_RESNET, 'UNet resnet')}"
            elif kind == "attentions":  # Transformer2DModel and sgm's SpatialTransformer share their names
                new = f"{names[(side, block, index)]}.1.{rest}"
            else:
                new = f"{names[(side, block, 'sample')]}.{rest.removeprefix('conv.')}"
        elif key.startswith("mid_block.resnets."):
            index, _, rest = key.removeprefix("mid_block.resnets.").partition(".")
            new = f"middle_block.{2 * int(index)}.{_rename(rest, _UNET_RESNET, 'UNet resnet')}"
        elif key.startswith("mid_block.attentions.0."):
            new = "middle_block.1." + key.removeprefix("mid_block.attentions.0.")
        else:
            new = _rename(key, _UNET_TOP, "UNet")
        out[new] = value
    return out


def vae_to_sgm(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A diffusers AutoencoderKL state dict with ldm names (no prefix); attention projections as 1x1 convs."""
    ups = {int(k.split(".")[2]) for k in state if k.startswith("decoder.up_blocks.")}
    out = {}
    for key, value in state.items():
        part, _, rest = key.partition(".")
        m = _VAE_BLOCK.match(rest)
        if m:
            side, block, resnet, tail = m.groups()
            level = int(block) if side == "down" else max(ups) - int(block)  # ldm counts decoder levels upwards
            if resnet is not None:
                new = f"{side}.{level}.block.{resnet}.{tail.replace('conv_shortcut', 'nin_shortcut')}"
            else:
                new = f"{side}.{level}.{side}sample.{tail}"
        elif rest.startswith("mid_block.resnets."):
            index, _, tail = rest.removeprefix("mid_block.resnets.").partition(".")
            new = f"mid.block_{int(index) + 1}.{tail.replace('conv_shortcut', 'nin_shortcut')}"
        elif rest.startswith("mid_block.attentions.0."):
            new = "mid.attn_1." + _rename(rest.removeprefix("mid_block.attentions.0."), _VAE_ATTN, "VAE attention")
            if value.ndim == 2:  # ldm's attention projections are Conv2d(C, C, 1)
                value = value[:, :, None, None]
        elif part in ("quant_conv", "post_quant_conv"):
            out[key] = value
            continue
        else:
            new = rest.replace("conv_norm_out", "norm_out")
            if new.split(".")[0] not in ("conv_in", "conv_out", "norm_out"):
                raise KeyError(f"no original-layout name for VAE key {key!r}")
        out[f"{part}.{new}"] = value
    return out


def clip_l_to_sgm(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """CLIPTextModel weights under ``text_model.*`` (transformers >= 5.6 saves them without it)."""
    return {"text_model." + k.removeprefix("text_model."): v for k, v in state.items()}


def clip_g_to_sgm(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A CLIPTextModelWithProjection state dict with open_clip names: q/k/v fused into in_proj,
    the projection stored as ``x @ text_projection`` (the transposed Linear weight)."""
    out: dict[str, Tensor] = {}
    qkv: dict[str, dict[str, Tensor]] = defaultdict(dict)
    for key, value in state.items():
        m = re.match(r"^text_model\.encoder\.layers\.(\d+)\.(.+)$", key)
        if m:
            layer, rest = f"transformer.resblocks.{m.group(1)}", m.group(2)
            proj = re.match(r"^self_attn\.([qkv])_proj\.(weight|bias)$", rest)
            if proj:
                qkv[f"{layer}.attn.in_proj_{proj.group(2)}"][proj.group(1)] = value
            else:
                out[f"{layer}.{_rename(rest, _CLIP_G_LAYER, 'OpenCLIP layer')}"] = value
        elif key == "text_projection.weight":
            out["text_projection"] = value.t().contiguous()
        else:
            out[_rename(key, _CLIP_G_TOP, "OpenCLIP")] = value
    for name, parts in qkv.items():
        out[name] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def sdxl_checkpoint(unet: dict[str, Tensor], vae: dict[str, Tensor], clip_l: dict[str, Tensor],
                    clip_g: dict[str, Tensor]) -> dict[str, Tensor]:
    """The four parts' state dicts as one original-layout SDXL checkpoint (keys as in sd_xl_base_1.0)."""
    out: dict[str, Tensor] = {}
    for prefix, part in ((UNET_PREFIX, unet_to_sgm(unet)), (VAE_PREFIX, vae_to_sgm(vae)),
                         (CLIP_L_PREFIX, clip_l_to_sgm(clip_l)), (CLIP_G_PREFIX, clip_g_to_sgm(clip_g))):
        out.update({prefix + k: v for k, v in part.items()})
    positions = out[CLIP_L_PREFIX + "text_model.embeddings.position_embedding.weight"].shape[0]
    out[CLIP_L_POSITION_IDS] = torch.arange(positions, dtype=torch.int64).unsqueeze(0)
    out[CLIP_G_LOGIT_SCALE] = torch.tensor(LOGIT_SCALE, dtype=torch.float32)
    return out
