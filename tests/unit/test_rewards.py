"""Reward models: real checkpoint formats, strict loading, gradients, scores, offline use."""

from __future__ import annotations

import json
import socket

import pytest
import torch

from dmdr.errors import UserError
from dmdr.models.tiny_clip import tiny_open_clip_config, write_tiny_reward_checkpoints
from dmdr.rewards import (
    HINGE_MARGIN,
    RewardSet,
    RewardSpec,
    _tokenizer,
    check_reward_file,
    load_reward,
    resolve_arch,
)
from helpers_rewards import block_network, colour_images, train_tiny_clip, write_config


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Tiny config JSON + CLIP-format + HPS-format checkpoints, written once per module."""
    return write_tiny_reward_checkpoints(tmp_path_factory.mktemp("rewards"), seed=0)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny):
    """A tiny CLIP trained a few contrastive steps on colour/caption pairs, in CLIP format."""
    path = tmp_path_factory.mktemp("trained") / "trained-clip.bin"
    torch.save(train_tiny_clip(json.loads(tiny["config"].read_text()), steps=30), path)
    return path


def spec(name, tiny, path=None, **kw):
    return RewardSpec(name, str(path or tiny[name]), arch=str(tiny["config"]), **kw)


# --- loading -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["clip", "hps"])
def test_tiny_checkpoints_load_in_their_real_format(tiny, name):
    raw = torch.load(tiny[name], weights_only=True)
    if name == "hps":
        assert set(raw) == {"state_dict"}
    else:
        assert "visual.conv1.weight" in raw and "state_dict" not in raw
    check_reward_file(spec(name, tiny))
    model = load_reward(spec(name, tiny))
    assert model.name == name and not model.training
    assert all(not p.requires_grad for p in model.parameters())
    assert not any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))


@pytest.mark.parametrize("name", ["clip", "hps"])
def test_scores_match_open_clip_own_loader(tiny, name):
    """Same weights through open_clip's loader: our score is the diagonal of its cosine matrix."""
    import open_clip
    from open_clip.model import CLIP

    ref = CLIP(**json.loads(tiny["config"].read_text())).eval()
    open_clip.load_checkpoint(ref, str(tiny[name]), strict=True)
    images, prompts = colour_images(size=32)  # already the model size: no resize
    model = load_reward(spec(name, tiny, prefix="Realistic photo" if name == "hps" else None))
    texts = [f"Realistic photo {p}" for p in prompts] if name == "hps" else prompts
    mean = torch.tensor(model.arch.mean).view(1, 3, 1, 1)
    std = torch.tensor(model.arch.std).view(1, 3, 1, 1)
    with torch.no_grad():
        img_f, txt_f, _ = ref((images - mean) / std, _tokenizer(77)(texts))
        expected = torch.diagonal(img_f @ txt_f.T)
        got = model.score(images, prompts)
    assert got.dtype == torch.float32 and got.shape == (4,)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_legacy_pickle_checkpoint_loads(tiny, tmp_path):
    legacy = tmp_path / "legacy.bin"
    torch.save(torch.load(tiny["clip"], weights_only=True), legacy, _use_new_zipfile_serialization=False)
    check_reward_file(spec("clip", tiny, legacy))
    images, prompts = colour_images()
    torch.testing.assert_close(
        load_reward(spec("clip", tiny, legacy)).score(images, prompts),
        load_reward(spec("clip", tiny)).score(images, prompts),
    )


def test_model_runs_in_inference_dtype_and_returns_float32(tiny):
    images, prompts = colour_images()
    fp32 = load_reward(spec("clip", tiny)).score(images, prompts)
    bf16_model = load_reward(spec("clip", tiny), dtype=torch.bfloat16)
    assert bf16_model.dtype == torch.bfloat16
    bf16 = bf16_model.score(images, prompts)
    assert bf16.dtype == torch.float32
    torch.testing.assert_close(bf16, fp32, atol=0.05, rtol=0)


def test_dfn5b_default_arch_uses_quickgelu():
    """Reference defect fixed: DFN5B-CLIP was trained with QuickGELU, the reference used GELU."""
    clip, hps = RewardSpec("clip", "x"), RewardSpec("hps", "x")
    assert clip.arch_or_default == "ViT-H-14-quickgelu"
    assert resolve_arch(clip.arch_or_default).model_cfg.get("quick_gelu") is True
    assert hps.arch_or_default == "ViT-H-14"
    assert not resolve_arch(hps.arch_or_default).model_cfg.get("quick_gelu", False)
    assert resolve_arch("ViT-H-14").image_size == (224, 224)


def test_activation_is_invisible_to_a_strict_load(tiny, tmp_path):
    """The same file loads strictly under GELU and QuickGELU but scores differently."""
    quick = write_config(tmp_path / "quick.json", quick_gelu=True)
    images, prompts = colour_images()
    gelu = load_reward(spec("clip", tiny)).score(images, prompts)
    qgelu = load_reward(RewardSpec("clip", str(tiny["clip"]), arch=str(quick))).score(images, prompts)
    assert not torch.allclose(gelu, qgelu, atol=1e-4)


# --- bad files fail fast with one clear message ------------------------------------------------


def _bad_files(tiny, tmp_path):
    data = tiny["clip"].read_bytes()
    (tmp_path / "empty.bin").write_bytes(b"")
    (tmp_path / "truncated.bin").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.bin").write_text("<html>404 Not Found</html>")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.bin")
    other_arch = write_config(tmp_path / "wide.json", width=48, heads=3)
    return {
        "missing": ("clip", tmp_path / "nope.bin", None, "not found"),
        "empty": ("clip", tmp_path / "empty.bin", None, "empty"),
        "truncated": ("clip", tmp_path / "truncated.bin", None, "truncated"),
        "text": ("clip", tmp_path / "text.bin", None, "not a PyTorch checkpoint"),
        "no-state-dict": ("clip", tmp_path / "other.bin", None, "does not fit architecture"),
        "hps-file-as-clip": ("clip", tiny["hps"], None, "--hpsv2-reward-model"),
        "clip-file-as-hps": ("hps", tiny["clip"], None, "--clip-reward-model"),
        "other-arch": ("clip", tiny["clip"], other_arch, "shape mismatches"),
        "builtin-arch": ("hps", tiny["hps"], "ViT-B-32", "--hps-reward-arch"),
    }


@pytest.mark.parametrize(
    "case", ["missing", "empty", "truncated", "text", "no-state-dict", "hps-file-as-clip",
             "clip-file-as-hps", "other-arch", "builtin-arch"],
)
def test_bad_checkpoint_fails_fast_with_clear_error(tiny, tmp_path, case):
    name, path, arch, needle = _bad_files(tiny, tmp_path)[case]
    bad = RewardSpec(name, str(path), arch=str(arch or tiny["config"]))
    for attempt in (check_reward_file, load_reward):
        with pytest.raises(UserError) as err:
            attempt(bad)
        msg = str(err.value)
        assert str(path) in msg and needle in msg
        assert bad.kind.file_name in msg and bad.kind.flag in msg
        assert "\n" not in msg


@pytest.mark.parametrize(
    "arch, needle",
    [("hf-hub:apple/DFN5B-CLIP-ViT-H-14", "not supported"), ("ViT-Z-99", "neither"),
     ("/nonexistent/model.json", "cannot read")],
)
def test_bad_arch_is_a_user_error(tiny, arch, needle):
    with pytest.raises(UserError, match=needle):
        load_reward(RewardSpec("clip", str(tiny["clip"]), arch=arch))


def test_unknown_reward_name_and_duplicates_are_user_errors(tiny):
    with pytest.raises(UserError, match="Unknown reward"):
        RewardSpec("imagereward", "x")
    with pytest.raises(UserError, match="once"):
        RewardSet([spec("clip", tiny), spec("clip", tiny)])


# --- scores and gradients ----------------------------------------------------------------------


def test_trained_model_prefers_the_matching_caption(tiny, trained):
    """score(image_i, caption_i) beats score(image_i, caption_j): the diagonal, per sample."""
    model = load_reward(spec("clip", tiny, trained))
    images, captions = colour_images()
    n = len(captions)
    own = model.score(images, captions)
    for shift in range(1, n):
        rolled = captions[shift:] + captions[:shift]  # image i paired with caption i+shift
        other = model.score(images, rolled)
        assert (own > other).all(), (shift, own, other)
    # Each score is the matching pair's cosine: scoring one image at a time gives the same.
    singles = torch.cat([model.score(images[i: i + 1], captions[i: i + 1]) for i in range(n)])
    torch.testing.assert_close(own, singles, atol=1e-5, rtol=1e-5)


def test_reward_loss_gives_gradients_to_generator_only(tiny):
    torch.manual_seed(0)
    generator = torch.nn.Conv2d(3, 3, 3, padding=1)
    rewards = RewardSet([
        spec("clip", tiny, weight=0.3),
        spec("hps", tiny, weight=0.3, prefix="Realistic photo"),
    ])
    images = torch.sigmoid(generator(torch.randn(2, 3, 64, 64)))  # any square size
    prompts = ["a red square", "a blue square"]
    loss, logs = rewards.loss(images, prompts)
    scores = rewards.scores(images, prompts)
    expected = sum(0.3 * torch.relu(HINGE_MARGIN - s).mean() for s in scores.values())
    torch.testing.assert_close(loss, expected)
    assert set(logs) == {"clip", "hps"} and logs["clip"] == pytest.approx(scores["clip"].mean().item())
    loss.backward()
    assert generator.weight.grad is not None and generator.weight.grad.abs().sum() > 0
    for model in rewards.models.values():
        assert all(p.grad is None and not p.requires_grad for p in model.parameters())


def test_zero_weight_reward_is_logged_without_gradients(tiny):
    rewards = RewardSet([spec("clip", tiny, weight=0.0)])
    images = torch.rand(2, 3, 32, 32, requires_grad=True)
    loss, logs = rewards.loss(images, ["a", "b"])
    assert float(loss) == 0.0 and not loss.requires_grad and "clip" in logs


def test_hps_prefix_changes_the_text(tiny):
    images, prompts = colour_images()
    plain = load_reward(spec("hps", tiny)).score(images, prompts)
    prefixed = load_reward(spec("hps", tiny, prefix="Realistic photo")).score(images, prompts)
    assert not torch.allclose(plain, prefixed)


def test_reward_set_loads_lazily_and_stays_in_eval(tiny):
    rewards = RewardSet([spec("clip", tiny, weight=1.0)])
    assert not rewards.loaded
    rewards.check()
    rewards.to("cpu")  # moving before the reward phase loads nothing
    assert not rewards.loaded
    rewards.scores(torch.rand(1, 3, 40, 40), ["x"])
    assert rewards.loaded
    model = rewards.models["clip"]
    rewards.to("cpu", torch.bfloat16)  # the trainer moves and casts when the reward phase starts
    assert model.dtype == torch.bfloat16
    assert rewards.scores(torch.rand(1, 3, 32, 32), ["x"])["clip"].dtype == torch.float32
    model.train()
    assert not model.training and not model.model.training
    assert model.device == torch.device("cpu")


def test_loading_and_scoring_never_touch_the_network(tiny, monkeypatch):
    block_network(monkeypatch)
    _tokenizer.cache_clear()  # build the bundled tokenizer with the network blocked
    rewards = RewardSet([spec("clip", tiny, weight=1.0), spec("hps", tiny, weight=1.0, prefix="p")])
    rewards.check()
    loss, logs = rewards.loss(torch.rand(2, 3, 32, 32), ["a cat", "a dog"])
    assert torch.isfinite(loss) and set(logs) == {"clip", "hps"}
    with pytest.raises(OSError, match="blocked"):  # the block itself is real
        socket.create_connection(("example.com", 80))


def test_tiny_config_fits_the_bundled_tokenizer():
    cfg = tiny_open_clip_config()
    assert cfg["text_cfg"]["context_length"] == 77 and cfg["text_cfg"]["vocab_size"] == 49408
    tokens = _tokenizer(77)(["hello"])
    assert tokens.shape == (1, 77) and int(tokens.max()) < 49408
