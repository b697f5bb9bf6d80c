"""`dmdr export --format single-file`: one SDXL .safetensors in the original (sgm) key layout.

On the tiny model the file loads through diffusers' real single-file loader (config= the local
tiny folder, no hub) into exactly the generator + the base's VAE and text encoders, and samples the
same image as the diffusers-format export. On full-size SDXL (built on the meta device from the
public configs in tests/data) the key set is checked against what is public about
sd_xl_base_1.0.safetensors.
"""
from __future__ import annotations

import copy
import json
import logging
import os
import re
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, LCMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from helpers_models import RES, randomize_lora_b, single_thread, tiny_path  # noqa: F401  (fixtures)
from safetensors import safe_open
from safetensors.torch import load_file

from dmdr.config import TrainConfig
from dmdr.errors import UserError
from dmdr.exports import ExportSource, diffusers_unet, export, sgm_keys, single_file
from dmdr.exports.diffusers_unet import merged_unet
from dmdr.models import add_generator_lora
from dmdr.models.sdxl import load_sdxl

CONFIGS = Path(__file__).resolve().parents[1] / "data" / "sdxl_base_1.0_configs.json"
TIMESTEPS = [999, 499]  # two steps: the LCM scheduler re-noises between them, as the DMD sampler does


@pytest.fixture(scope="module")
def source(tiny_path):  # noqa: F811
    """A LoRA generator with random B (so it differs from the teacher), trained from the tiny base."""
    parts = load_sdxl(tiny_path)  # vae "tiny", as training decodes: the export must fetch the base's KL VAE itself
    unet = copy.deepcopy(parts.unet)
    add_generator_lora(unet, rank=4, alpha=8)
    randomize_lora_b(unet)
    cfg = TrainConfig(pretrained_model=str(tiny_path), exp_name="sf-run", sample_num_steps=len(TIMESTEPS),
                      generator_timesteps=TIMESTEPS)
    return ExportSource(cfg, tiny_path.parent / "sf-run", 7, parts, unet, TIMESTEPS)


def _image(pipe) -> torch.Tensor:
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a red fox, photograph", num_inference_steps=len(TIMESTEPS), timesteps=TIMESTEPS, guidance_scale=0.0,
               height=RES, width=RES, output_type="pt", generator=torch.Generator().manual_seed(3)).images
    return out.float()


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_single_file_loads_through_diffusers_and_samples_like_the_diffusers_export(source, tiny_path, tmp_path,
                                                                                    dtype, caplog):
    cast = {"fp32": torch.float32, "fp16": torch.float16}[dtype]
    path = single_file.write(source, tmp_path / "dmdr.safetensors", dtype)
    unet_dir = diffusers_unet.write(source, tmp_path / "unet", dtype)

    with caplog.at_level(logging.WARNING):
        pipe = StableDiffusionXLPipeline.from_single_file(str(path), config=str(tiny_path), local_files_only=True,
                                                          torch_dtype=torch.float32)
    assert not [r for r in caplog.records if re.search(r"unexpected|missing|not used|newly initialized",
                                                       r.getMessage(), re.I)]
    # every component is exactly its source (at the export's precision): nothing missing, nothing mixed up
    base_vae = AutoencoderKL.from_pretrained(tiny_path, subfolder="vae")
    expected = {"unet": merged_unet(source.unet, torch.float32), "vae": base_vae,
                "text_encoder": source.parts.text_encoder_one, "text_encoder_2": source.parts.text_encoder_two}
    loaded_numel = 0
    for name, want in expected.items():
        got, ref = getattr(pipe, name).state_dict(), want.state_dict()
        assert got.keys() == ref.keys(), name
        assert all(torch.equal(got[k], ref[k].to(cast).float()) for k in ref), name
        loaded_numel += sum(v.numel() for v in got.values())
    teacher = source.parts.unet.down_blocks[0].resnets[0].conv1.weight  # the generator (LoRA merged), not the teacher
    assert not torch.equal(pipe.unet.down_blocks[0].resnets[0].conv1.weight, teacher.to(cast).float())
    tensors = load_file(str(path))  # nothing unused: the file holds exactly these weights plus the two extras
    assert sum(v.numel() for v in tensors.values()) == loaded_numel + 77 + 1  # position_ids [1, 77], logit_scale []
    assert {v.dtype for k, v in tensors.items() if k != sgm_keys.CLIP_L_POSITION_IDS} == {cast}

    exported = StableDiffusionXLPipeline.from_pretrained(
        tiny_path, unet=UNet2DConditionModel.from_pretrained(unet_dir, torch_dtype=torch.float32))
    a, b = _image(pipe), _image(exported)
    diff = (a - b).abs().max().item()
    print(f"{dtype}: max |single-file - diffusers export| = {diff:.2e}")
    if dtype == "fp32":  # the weights are bit for bit the same (above); what remains (~1e-6) is the CPU matmul
        # kernel picked by the loaded tensors' memory alignment (copying both into fresh tensors makes it 0)
        assert diff < 1e-5
    else:  # the UNets are the same fp16 weights; the file's VAE and text encoders are fp16 roundings of the
        # base's fp32 ones (relative error <= 2**-11 ~ 5e-4 per weight); measured 4.5e-4 on these [0, 1] images,
        # the bound is 10x that (an fp16 bug - a wrong or missing tensor - moves pixels by far more)
        assert diff < 5e-3


def test_the_header_says_what_the_file_is_and_how_to_sample_it(source, tmp_path):
    path = single_file.write(source, tmp_path / "m.safetensors", "fp16")
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # as any file the user writes, not mkstemp's 0600
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temporary file left
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["dmdr.timesteps"]) == TIMESTEPS and meta["dmdr.num_steps"] == "2"
    assert meta["dmdr.conditioning_timestep"] == str(source.cfg.conditioning_timestep)
    assert (meta["dmdr.source_run"], meta["dmdr.source_step"], meta["dmdr.dtype"]) == ("sf-run", "7", "fp16")
    assert meta["dmdr.guidance_scale"] == "0" and meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base"
    # the base model by its folder name: no path of the training machine
    assert meta["dmdr.base_model"] == Path(source.cfg.pretrained_model).name
    assert str(tmp_path) not in json.dumps(meta) and str(Path.home()) not in json.dumps(meta)


def test_the_header_never_holds_credentials(source, tmp_path):
    cfg = copy.copy(source.cfg)
    cfg.pretrained_model = "s3://AKIAEXAMPLE:s3cr3t@bucket/sdxl?X-Amz-Signature=abc"
    meta = single_file.metadata(ExportSource(cfg, source.run_dir, 7, source.parts, source.unet, TIMESTEPS), "fp16")
    assert "s3cr3t" not in json.dumps(meta) and "abc" not in json.dumps(meta)
    for spec, recorded in (("/opt/pod-only/sdxl-base", "sdxl-base"), ("stabilityai/stable-diffusion-xl-base-1.0",
                                                                          "stabilityai/stable-diffusion-xl-base-1.0")):
        cfg.pretrained_model = spec  # a training pod's path by its folder name only; a hub id as is
        assert single_file.metadata(ExportSource(cfg, source.run_dir, 7, source.parts, source.unet, TIMESTEPS),
                                    "fp16")["dmdr.base_model"] == recorded


def test_out_must_name_a_safetensors_file(source, tmp_path):
    with pytest.raises(UserError, match=r"--out .*: --format single-file writes one file; name it .*\.safetensors"):
        export(tmp_path / "no-run", "latest", tmp_path / "folder", fmt="single-file")  # refused before any load
    assert not (tmp_path / "folder").exists()


def _full_size_checkpoint() -> dict[str, torch.Tensor]:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = json.loads(CONFIGS.read_text())
    with torch.device("meta"):
        parts = (UNet2DConditionModel.from_config(cfg["unet"]), AutoencoderKL.from_config(cfg["vae"]),
                 CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"])),
                 CLIPTextModelWithProjection(CLIPTextConfig(**cfg["text_encoder_2"])))
    return sgm_keys.sdxl_checkpoint(*(p.state_dict() for p in parts)), parts, cfg


def test_full_size_keys_are_those_of_sd_xl_base_1_0():
    """What is public about sd_xl_base_1.0.safetensors, checked on the mapped full-size SDXL.

    - 2515 tensors (its count as loaders report it; = 1680 UNet + 248 VAE + 197 CLIP-L + 390 OpenCLIP here);
    - diffusers' detection keys (CHECKPOINT_KEY_NAMES: xl_base, clip_sdxl, open_clip_sdxl) and model type;
    - the two non-weight keys kohya's loader and the A1111 fix script expect (position_ids int64 [1, 77],
      logit_scale);
    - the UNet's transformer depths per block as the public key table of the SDXL base UNet in
      liuliu/swift-diffusion examples/fooocus_inpaint/main.swift lists them (input_blocks 4, 5: 2; 7, 8: 10;
      middle: 10; output_blocks 0-2: 10, 3-5: 2), and the ldm shapes of known tensors;
    - diffusers' own original->diffusers converters take every part back to exactly the diffusers keys.
    """
    from diffusers.loaders.single_file_utils import (
        CHECKPOINT_KEY_NAMES,
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
        infer_diffusers_model_type,
    )

    ckpt, (unet, vae, te1, te2), cfg = _full_size_checkpoint()
    assert len(ckpt) == 2515
    prefixes = (sgm_keys.UNET_PREFIX, sgm_keys.VAE_PREFIX, sgm_keys.CLIP_L_PREFIX, sgm_keys.CLIP_G_PREFIX)
    assert all(k.startswith(prefixes) for k in ckpt)
    for kind in ("xl_base", "clip_sdxl", "open_clip_sdxl"):
        assert CHECKPOINT_KEY_NAMES[kind] in ckpt, kind
    assert infer_diffusers_model_type(ckpt) == "xl_base"
    assert ckpt[sgm_keys.CLIP_L_POSITION_IDS].dtype == torch.int64
    assert ckpt[sgm_keys.CLIP_L_POSITION_IDS].tolist() == [list(range(77))]
    assert ckpt[sgm_keys.CLIP_G_LOGIT_SCALE].shape == ()
    shapes = {
        "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
        "model.diffusion_model.label_emb.0.0.weight": (1280, 2816),
        "model.diffusion_model.input_blocks.3.0.op.weight": (320, 320, 3, 3),
        "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": (640, 2048),
        "model.diffusion_model.output_blocks.2.2.conv.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.output_blocks.8.0.skip_connection.weight": (320, 640, 1, 1),
        "model.diffusion_model.out.2.weight": (4, 320, 3, 3),
        "first_stage_model.encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
        "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
        "first_stage_model.decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
        "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": (768,),
        "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight": (3840, 1280),
        "conditioner.embedders.1.model.text_projection": (1280, 1280),
        "conditioner.embedders.1.model.positional_embedding": (77, 1280),
    }
    assert {k: tuple(ckpt[k].shape) for k in shapes} == shapes
    depth: dict[str, int] = {}
    attn2 = re.compile(r"model\.diffusion_model\.((?:in|out)put_blocks\.\d+|middle_block)\.1\."
                       r"transformer_blocks\.(\d+)\.attn2\.to_k\.weight$")
    for key in ckpt:
        if m := attn2.match(key):
            depth[m.group(1)] = max(depth.get(m.group(1), 0), int(m.group(2)) + 1)
    assert depth == {"input_blocks.4": 2, "input_blocks.5": 2, "input_blocks.7": 10, "input_blocks.8": 10,
                     "middle_block": 10, "output_blocks.0": 10, "output_blocks.1": 10, "output_blocks.2": 10,
                     "output_blocks.3": 2, "output_blocks.4": 2, "output_blocks.5": 2}

    back_unet = convert_ldm_unet_checkpoint(ckpt, cfg["unet"])
    assert back_unet.keys() == unet.state_dict().keys()
    assert back_unet.keys() == {k for k in back_unet if back_unet[k] is not None}
    assert convert_ldm_vae_checkpoint(ckpt, cfg["vae"]).keys() == vae.state_dict().keys()
    te1_back = {k.removeprefix("text_model."): v for k, v in convert_ldm_clip_checkpoint(ckpt).items()}
    assert te1_back.keys() - {"embeddings.position_ids"} == te1.state_dict().keys()
    te2_back = convert_open_clip_checkpoint(te2, ckpt, prefix=sgm_keys.CLIP_G_PREFIX)
    assert te2_back.keys() == te2.state_dict().keys()
    assert tuple(te2_back["text_projection.weight"].shape) == (1280, 1280)


def test_the_tiny_file_is_not_detected_as_sdxl_without_config(source, tmp_path):
    """Why the loader needs config=: diffusers detects SDXL base by a key of the 10th OpenCLIP layer
    (CHECKPOINT_KEY_NAMES['xl_base'], resblocks.9); the tiny text encoder has two layers."""
    from diffusers.loaders.single_file_utils import CHECKPOINT_KEY_NAMES, infer_diffusers_model_type

    ckpt = load_file(str(single_file.write(source, tmp_path / "t.safetensors", "fp32")))
    assert CHECKPOINT_KEY_NAMES["xl_base"].replace("resblocks.9", "resblocks.1") in ckpt
    assert CHECKPOINT_KEY_NAMES["xl_base"] not in ckpt and infer_diffusers_model_type(ckpt) != "xl_base"
