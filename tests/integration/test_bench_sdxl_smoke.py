"""The prepared GPU benchmark (tests/bench/gpu_sdxl.sh -> bench_step.py --mode sdxl) must not rot
between the sessions that have a GPU: here the same code runs on the CPU with an SDXL-shaped
but narrow UNet config, tiny reward models and one step, and every row must come back clean."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

SDXL_CONFIG = Path(__file__).resolve().parents[3] / "shared" / "reference" / "sdxl_unet_config.json"


def narrow_sdxl_config() -> dict:
    """SDXL's UNet config (text_time conditioning, 2048-d cross attention) with narrow blocks."""
    import bench_step

    path = SDXL_CONFIG if SDXL_CONFIG.exists() else Path(bench_step.DEFAULT_UNET_CONFIG)
    cfg = json.loads(path.read_text()) if path.exists() else {
        "_class_name": "UNet2DConditionModel", "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
        "cross_attention_dim": 2048, "projection_class_embeddings_input_dim": 2816, "use_linear_projection": True,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "mid_block_type": "UNetMidBlock2DCrossAttn", "in_channels": 4, "out_channels": 4}
    cfg.update(block_out_channels=[16, 32, 32], transformer_layers_per_block=[1, 1, 1],
               attention_head_dim=[2, 4, 4], norm_num_groups=8, layers_per_block=1)
    return cfg


def test_variant_tokens():
    from sdxl_bench import Variant

    v = Variant.parse("fp16/ckpt/b4/rewards/adam8bit/fsdp")
    assert (v.mixed_precision, v.checkpointing, v.batch, v.rewards, v.adam8bit, v.fsdp) == ("fp16", True, 4, True, True, True)
    with pytest.raises(ValueError, match="unknown token 'b4x'"):
        Variant.parse("bf16/b4x")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sdxl_bench_runs_on_cpu(tmp_path, capsys):
    import bench_step

    from dmdr.models.tiny_clip import tiny_open_clip_config

    unet = tmp_path / "unet.json"
    unet.write_text(json.dumps(narrow_sdxl_config()))
    clip = tmp_path / "clip.json"
    clip.write_text(json.dumps(tiny_open_clip_config()))
    out = tmp_path / "rows.json"
    bench_step.main(["--mode", "sdxl", "--unet-config", str(unet), "--resolution", "32", "--steps", "1",
                     "--warmup", "0", "--flops", "--reward-archs", str(clip), str(clip), "--json", str(out),
                     "--variants", "no/nockpt/b1", "bf16/ckpt/b2/rewards"])
    rows = json.loads(out.read_text())
    assert [r["variant"] for r in rows] == ["no/nockpt/b1", "bf16/ckpt/b2/rewards"]
    for r in rows:
        assert "error" not in r, r
        assert r["s_per_gen_step"] > 0 and r["flops_per_gen_step"] > 0 and r["mfu"] > 0
    # checkpointing recomputes forward passes: more FLOPs counted per image than without
    assert rows[1]["flops_per_gen_step"] / 2 > rows[0]["flops_per_gen_step"]
