"""The tiny random SDXL pipeline: build, idempotence, loading, tokenizers, conditioning, UNet calls."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from diffusers import AutoencoderKL, AutoencoderTiny, StableDiffusionXLPipeline
from helpers_models import RES, single_thread, tiny_path, unet_inputs  # noqa: F401  (fixtures)
from safetensors.torch import load_file

from dmdr.errors import UserError
from dmdr.models import sdxl
from dmdr.models import (
    build_tiny_sdxl,
    decode_to_images,
    encode_prompts,
    load_sdxl,
    predict_eps,
    register_pretrained_resolver,
    resolve_pretrained,
    time_ids,
)
from dmdr.models.tiny import COMPLETE_MARKER, TINY_SPEC_VERSION

PROMPTS = ["a photo of the cat with a dog", "Ünïcödé — 日本語の猫 🚀🐈 ‘quotes’ \t\n tabs"]


@pytest.fixture(scope="module")
def parts(tiny_path):
    return load_sdxl(tiny_path)


def test_build_writes_a_complete_pipeline_once(tiny_path):
    marker = json.loads((tiny_path / COMPLETE_MARKER).read_text())
    assert marker["spec_version"] == TINY_SPEC_VERSION
    for sub in ("unet", "vae", "vae_tiny", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"):
        assert (tiny_path / sub).is_dir(), sub
    assert (tiny_path / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (tiny_path / "tokenizer" / "vocab.json").is_file() and (tiny_path / "tokenizer" / "merges.txt").is_file()
    weights = tiny_path / "unet" / "diffusion_pytorch_model.safetensors"
    before = weights.stat().st_mtime_ns
    assert build_tiny_sdxl(tiny_path) == tiny_path
    assert weights.stat().st_mtime_ns == before
    assert not [p for p in tiny_path.parent.iterdir() if ".build-" in p.name]


def test_build_is_deterministic_and_replaces_a_half_folder(tmp_path, tiny_path):
    half = tmp_path / "tiny"
    (half / "unet").mkdir(parents=True)  # a crashed, unmarked folder
    build_tiny_sdxl(half, seed=0)
    other = build_tiny_sdxl(tmp_path / "seed1", seed=1)
    same = load_file(half / "unet" / "diffusion_pytorch_model.safetensors")
    ref = load_file(tiny_path / "unet" / "diffusion_pytorch_model.safetensors")
    diff = load_file(other / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(same[k], ref[k]) for k in ref)
    assert not all(torch.equal(diff[k], ref[k]) for k in ref)


def test_scheduler_config_is_sdxl(parts):
    cfg = parts.scheduler_config
    assert cfg["beta_schedule"] == "scaled_linear" and cfg["prediction_type"] == "epsilon"
    assert (cfg["beta_start"], cfg["beta_end"], cfg["num_train_timesteps"]) == (0.00085, 0.012, 1000)
    ac = parts.alphas_cumprod
    assert ac.dtype == torch.float32 and ac.shape == (1000,)
    assert ac[0].item() == pytest.approx(1 - 0.00085) and ac[-1].item() == pytest.approx(0.00466, rel=1e-2)


def test_load_sdxl_both_vae_kinds_frozen(tiny_path, parts):
    full = load_sdxl(tiny_path, vae="full")
    assert isinstance(parts.vae, AutoencoderTiny) and parts.vae_kind == "tiny"
    assert isinstance(full.vae, AutoencoderKL) and full.vae_kind == "full"
    for module in (parts.unet, parts.vae, parts.text_encoder_one, parts.text_encoder_two, full.vae):
        assert not module.training
        assert not any(p.requires_grad for p in module.parameters())
    latents = torch.randn(1, 4, RES // 8, RES // 8, requires_grad=True)
    for vae in (parts.vae, full.vae):
        images = decode_to_images(vae, latents)
        assert images.shape == (1, 3, RES, RES) and images.min() >= 0 and images.max() <= 1
        images.sum().backward()
    assert latents.grad is not None and latents.grad.abs().sum() > 0


def test_tiny_vae_lookup(tiny_path, tmp_path, monkeypatch):
    bare = tmp_path / "bare"
    shutil.copytree(tiny_path, bare, ignore=shutil.ignore_patterns("vae_tiny"))
    monkeypatch.delenv("DMDR_WEIGHTS_DIR", raising=False)
    with pytest.raises(UserError, match="--tiny-vae-path"):
        load_sdxl(bare)
    assert isinstance(load_sdxl(bare, tiny_vae_path=str(tiny_path / "vae_tiny")).vae, AutoencoderTiny)
    shutil.copytree(tiny_path / "vae_tiny", tmp_path / "weights" / "taesdxl")
    monkeypatch.setenv("DMDR_WEIGHTS_DIR", str(tmp_path / "weights"))
    assert isinstance(load_sdxl(bare).vae, AutoencoderTiny)
    with pytest.raises(UserError, match="not an AutoencoderTiny folder"):
        load_sdxl(bare, tiny_vae_path=str(tmp_path / "nowhere"))


def test_loads_as_a_diffusers_pipeline_offline(tiny_path):
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_path)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(PROMPTS[:1], num_inference_steps=2, height=RES, width=RES, guidance_scale=5.0,
               generator=torch.Generator().manual_seed(0), output_type="np")
    assert out.images.shape == (1, RES, RES, 3)


def test_tokenizers_handle_any_text(parts, tiny_path, tmp_path):
    long = "word " * 200
    for tok in (parts.tokenizer_one, parts.tokenizer_two):
        enc = tok(PROMPTS + [long, ""], padding="max_length", max_length=77, truncation=True)
        for ids in enc.input_ids:
            assert len(ids) == 77 and ids[0] == tok.bos_token_id and tok.eos_token_id in ids
            assert tok.unk_token_id not in ids[1 : ids.index(tok.eos_token_id)]  # every byte has a token
        assert enc.input_ids[2][-1] == tok.eos_token_id  # truncated, still closed
        assert tok.decode(tok(PROMPTS[0]).input_ids, skip_special_tokens=True) == PROMPTS[0]
    assert parts.tokenizer_two.pad_token == "!"  # as SDXL's second tokenizer
    # The real SDXL repository ships vocab.json + merges.txt only: that must load too.
    bpe_only = tmp_path / "tok"
    shutil.copytree(tiny_path / "tokenizer", bpe_only)
    (bpe_only / "tokenizer.json").unlink()
    from transformers import CLIPTokenizer

    again = CLIPTokenizer.from_pretrained(bpe_only)
    assert again(PROMPTS).input_ids == parts.tokenizer_one(PROMPTS).input_ids


def test_encode_prompts_shapes(parts):
    embeds, pooled = encode_prompts(parts, PROMPTS, "cpu")
    assert embeds.shape == (2, 77, 32 + 48) and pooled.shape == (2, 32)
    assert embeds.dtype == torch.float32 and not embeds.requires_grad
    alone, _ = encode_prompts(parts, PROMPTS[:1], "cpu")
    assert torch.allclose(alone[0], embeds[0], atol=1e-5)


def test_time_ids():
    ids = time_ids(1024, 3, "cpu", torch.float16)
    assert ids.shape == (3, 6) and ids.dtype == torch.float16
    assert ids[0].tolist() == [1024, 1024, 0, 0, 1024, 1024]


def test_predict_eps_shapes_and_cfg(parts):
    x, t, _, _ = unet_inputs()
    embeds, pooled = encode_prompts(parts, PROMPTS, "cpu")
    u_embeds, u_pooled = encode_prompts(parts, [""], "cpu")
    cond = predict_eps(parts.unet, x, t, embeds, pooled, RES)
    assert cond.shape == x.shape and cond.dtype == x.dtype
    assert torch.equal(predict_eps(parts.unet, x, t, embeds, pooled, RES, uncond=(u_embeds, u_pooled), cfg=1.0), cond)
    guided = predict_eps(parts.unet, x, t, embeds, pooled, RES, uncond=(u_embeds, u_pooled), cfg=7.0)
    uncond = predict_eps(parts.unet, x, t, u_embeds.expand(2, -1, -1), u_pooled.expand(2, -1), RES)
    assert torch.allclose(guided, uncond + 7.0 * (cond - uncond), atol=1e-4)
    scalar_t = predict_eps(parts.unet, x, 399, embeds, pooled, RES)
    assert torch.allclose(scalar_t, predict_eps(parts.unet, x, torch.full((2,), 399), embeds, pooled, RES))
    with pytest.raises(ValueError, match="uncond"):
        predict_eps(parts.unet, x, t, embeds, pooled, RES, cfg=7.0)


def test_resolve_pretrained(tmp_path, tiny_path, monkeypatch):
    built = resolve_pretrained("builtin:tiny", tmp_path / "cache")
    assert built == tmp_path / "cache" / f"tiny-sdxl-v{TINY_SPEC_VERSION}" and (built / COMPLETE_MARKER).is_file()
    assert resolve_pretrained(str(tiny_path), tmp_path) == tiny_path
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="model_index.json"):
        resolve_pretrained(str(tmp_path / "empty"), tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="not a local folder, and HF_HUB_OFFLINE is set; .*--preset tiny"):
        resolve_pretrained("stabilityai/stable-diffusion-xl-base-1.0", tmp_path)
    with pytest.raises(UserError, match="no resolver for gs://"):
        resolve_pretrained("gs://bucket/sdxl", tmp_path)
    monkeypatch.setattr(sdxl, "PRETRAINED_RESOLVERS", {})  # keep the registration local to this test
    register_pretrained_resolver("testfs", lambda spec, cache: tiny_path)
    assert resolve_pretrained("testfs://anything", tmp_path) == tiny_path
