"""A random, tiny SDXL-architecture pipeline, saved in the real diffusers format.

Tests and the `builtin:tiny` preset use it instead of downloading weights: every part has the
structure of SDXL (two CLIP text encoders, a `text_time` UNet with cross-attention blocks, a
KL VAE with an 8x downscale, a taesdxl-style `AutoencoderTiny`) at a size that runs on a CPU in
milliseconds. The tokenizers are byte-level BPE tokenizers whose vocab.json/merges.txt are written
here, so no tokenizer is ever fetched from a hub.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

#: Bump whenever the architecture or the weights produced for a seed change.
TINY_SPEC_VERSION = 1

#: Written last into a finished pipeline folder; holds the spec version and the seed.
COMPLETE_MARKER = ".dmdr-tiny-complete"

MAX_LENGTH = 77
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
TEXT_HIDDEN = (32, 48)  # hidden sizes of text_encoder and text_encoder_2 (distinct on purpose)
PROJECTION_DIM = 32  # text_encoder_2 projection (pooled embedding) size
TIME_EMBED_DIM = 8  # UNet addition_time_embed_dim

# Merges for frequent English fragments: not needed for coverage (every byte has a token) but
# they make the tokenizer a real BPE one. Each pair is merged in this order.
_MERGES = [
    ("t", "h"), ("th", "e</w>"), ("a", "n"), ("an", "d</w>"), ("i", "n"), ("in", "g</w>"),
    ("e", "r"), ("o", "n"), ("r", "e"), ("e", "s</w>"), ("o", "f</w>"), ("a", "t"),
    ("o", "r</w>"), ("e", "n"), ("a", "r"), ("s", "t"), ("p", "h"), ("ph", "o"), ("t", "o</w>"),
    ("pho", "to</w>"), ("c", "a"), ("ca", "t</w>"), ("d", "o"), ("do", "g</w>"), ("a", "l"),
    ("e", "d</w>"), ("l", "y</w>"), ("i", "s</w>"), ("w", "i"), ("t", "h</w>"), ("wi", "th</w>"),
]


def _byte_alphabet() -> list[str]:
    """The 256 printable characters byte-level BPE uses for the bytes 0..255 (GPT-2 layout)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def tiny_vocab() -> tuple[dict[str, int], list[str]]:
    """The tokenizer vocabulary (token -> id) and merge rules ("a b" lines) of the tiny pipeline.

    Layout as in CLIP: byte tokens, the same with the end-of-word suffix, merged tokens, then
    the start and end tokens last.
    """
    alphabet = _byte_alphabet()
    tokens = alphabet + [c + "</w>" for c in alphabet]
    for left, right in _MERGES:
        merged = left + right
        if merged not in tokens:
            tokens.append(merged)
    tokens += [BOS, EOS]
    return {tok: i for i, tok in enumerate(tokens)}, [f"{a} {b}" for a, b in _MERGES]


def _write_tokenizer_files(folder: Path) -> None:
    vocab, merges = tiny_vocab()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


def _build_tokenizer(folder: Path, pad_token: str):
    from transformers import CLIPTokenizer

    _write_tokenizer_files(folder)
    return CLIPTokenizer(
        vocab=str(folder / "vocab.json"),
        merges=str(folder / "merges.txt"),
        model_max_length=MAX_LENGTH,
        pad_token=pad_token,
    )


def _text_config(hidden: int, vocab_size: int, projection_dim: int | None):
    from transformers import CLIPTextConfig

    vocab, _ = tiny_vocab()
    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=2,  # SDXL conditions on hidden_states[-2]: needs at least two layers
        num_attention_heads=4,
        max_position_embeddings=MAX_LENGTH,
        hidden_act="quick_gelu",
        bos_token_id=vocab[BOS],
        eos_token_id=vocab[EOS],
        pad_token_id=vocab[EOS],
    )
    if projection_dim is not None:
        kwargs["projection_dim"] = projection_dim
    return CLIPTextConfig(**kwargs)


def _unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        transformer_layers_per_block=1,
        norm_num_groups=8,
        cross_attention_dim=sum(TEXT_HIDDEN),
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=TIME_EMBED_DIM * 6 + PROJECTION_DIM,
    )


def _vae():
    from diffusers import AutoencoderKL

    four = ("DownEncoderBlock2D",) * 4
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=four,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),  # three downsamplers: 64 px -> 8x8 latent
        layers_per_block=1,
        norm_num_groups=4,
        latent_channels=4,
        sample_size=64,
        scaling_factor=0.13025,  # the SDXL VAE's value
        force_upcast=True,
    )


def _vae_tiny():
    from diffusers import AutoencoderTiny

    return AutoencoderTiny(
        encoder_block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8),
        num_encoder_blocks=(1, 1, 1, 1),
        num_decoder_blocks=(1, 1, 1, 1),
        latent_channels=4,
        scaling_factor=1.0,
        shift_factor=0.0,
    )


def sdxl_scheduler_config() -> dict:
    """The scheduler config SDXL base 1.0 ships (EulerDiscrete, scaled_linear, epsilon)."""
    return {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "prediction_type": "epsilon",
        "steps_offset": 1,
        "timestep_spacing": "leading",
        "interpolation_type": "linear",
        "use_karras_sigmas": False,
        "clip_sample": False,
        "sample_max_value": 1.0,
        "set_alpha_to_one": False,
        "skip_prk_steps": True,
    }


def _build_into(folder: Path, seed: int) -> None:
    """Build every part with a fixed seed and save the pipeline plus `vae_tiny/` into `folder`."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tok_src = folder / ".tokenizer-src"
    tokenizer = _build_tokenizer(tok_src / "one", pad_token=EOS)
    tokenizer_2 = _build_tokenizer(tok_src / "two", pad_token="!")  # SDXL's second tokenizer pads with "!"
    vocab_size = len(tiny_vocab()[0])

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(_text_config(TEXT_HIDDEN[0], vocab_size, None))
        text_encoder_2 = CLIPTextModelWithProjection(
            _text_config(TEXT_HIDDEN[1], vocab_size, PROJECTION_DIM)
        )
        unet = _unet()
        vae = _vae()
        vae_tiny = _vae_tiny()

    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=EulerDiscreteScheduler.from_config(sdxl_scheduler_config()),
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    vae_tiny.save_pretrained(folder / "vae_tiny", safe_serialization=True)
    # Keep vocab.json/merges.txt beside tokenizer.json, as in the real SDXL repository, so the
    # folders also load where only the BPE files are read.
    for sub in ("tokenizer", "tokenizer_2"):
        _write_tokenizer_files(folder / sub)
    shutil.rmtree(tok_src)


def _is_complete(path: Path) -> bool:
    marker = path / COMPLETE_MARKER
    try:
        return json.loads(marker.read_text()).get("spec_version") == TINY_SPEC_VERSION
    except (OSError, ValueError):
        return False


def build_tiny_sdxl(path: str | Path, seed: int = 0) -> Path:
    """Build the tiny random SDXL pipeline at `path` (diffusers format) and return the path.

    Idempotent: a folder already holding a finished build of this spec version is returned as is
    (whatever seed built it). The build goes to a temporary sibling folder that is renamed into
    place, so a crash never leaves a half pipeline; concurrent builders are safe.
    """
    path = Path(path)
    if _is_complete(path):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.build-", dir=path.parent))
    try:
        _build_into(tmp, seed)
        (tmp / COMPLETE_MARKER).write_text(
            json.dumps({"spec_version": TINY_SPEC_VERSION, "seed": seed}) + "\n"
        )
        if path.exists():  # stale or unfinished folder of another version: move it aside first
            if _is_complete(path):
                return path
            stale = Path(tempfile.mkdtemp(prefix=f".{path.name}.stale-", dir=path.parent))
            os.replace(path, stale / "old")
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.replace(tmp, path)
        except OSError:
            if not _is_complete(path):  # lost a race with another builder that failed: surface it
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path
