"""One rank of the FSDP check (``torchrun --nproc-per-node 2 tests/helpers_fsdp.py MODE LORA_GEN OUT CACHE``).

Builds the tiny models and shards them exactly as ``dmdr train --distributed fsdp`` does
(components.build_models + Trainer.prepare_models), takes one real update of each model
(Trainer.update: autocast, clipping, optimiser step), saves the sharded state, takes another
update, loads the saved state back and checks the models and optimisers are restored.
Rank 0 writes the live unsharded state at save time to OUT/live.pt for the test to compare.
"""
import sys
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
from torch.distributed.tensor import DTensor, Shard

from dmdr import components
from dmdr.config import TrainConfig, load_preset
from dmdr.models import sdxl
from dmdr.train import Trainer

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def live_state(t: Trainer) -> dict:
    """The unsharded weights and optimiser state (gathered on rank 0; empty elsewhere)."""
    return {
        "gen": get_model_state_dict(t.gen, options=FULL),
        "gui": {k: v for k, v in get_model_state_dict(t.gui, options=FULL).items() if ".lora_" in k},
        "opt_gen": get_optimizer_state_dict(t.gen, t.opt_gen.optimizer, options=FULL).get("state", {}),
        "opt_gui": get_optimizer_state_dict(t.gui, t.opt_gui.optimizer, options=FULL).get("state", {}),
    }


def update_both(t: Trainer, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    lat = t.cfg.resolution // 8
    x, embeds, pooled = (torch.randn(s, generator=g) for s in ((2, 4, lat, lat), (2, 77, 80), (2, 32)))
    steps = torch.tensor([100, 700])
    for acc, model, opt, sched, scale in ((t.acc_gui, t.gui, t.opt_gui, t.sched_gui, 1.0),
                                          (t.acc, t.gen, t.opt_gen, t.sched_gen, None)):
        with acc.autocast():
            loss = sdxl.predict_eps(model, x, steps, embeds, pooled, t.cfg.resolution, lora_scale=scale).float().square().mean()
        t.update(acc, model, opt, sched, loss)


def main(mode: str, lora_gen: bool, out: Path, cache: str) -> None:
    cfg = TrainConfig(**{**load_preset("tiny"), "output_dir": str(out), "cache_dir": cache, "mixed_precision": mode,
                         "distributed": "fsdp", "use_lora_gen": lora_gen})
    t = Trainer.__new__(Trainer)
    t.cfg = cfg
    t.acc, t.acc_gui = components.make_accelerators(cfg)
    with t.acc.local_main_process_first():
        models = components.build_models(cfg, t.acc.device)
    t.prepare_models(models.generator, models.guidance)
    low = components.INFERENCE_DTYPES[mode]
    for name, p in t.gui.named_parameters():  # frozen teacher in low precision next to fp32 LoRA
        assert isinstance(p, DTensor) and p.placements == (Shard(0),), name
        assert p.dtype == (torch.float32 if ".lora_" in name else low), (name, p.dtype)
    assert all(isinstance(p, DTensor) and p.dtype == torch.float32 for p in t.gen.parameters())
    assert any(p.requires_grad for p in t.gen.parameters())

    update_both(t, seed=1)
    saved = live_state(t)
    t.sharded.save(out / "checkpoints", 1)
    if t.acc.is_main_process:
        torch.save(saved, out / "live.pt")
    update_both(t, seed=2)
    changed = live_state(t)
    t.sharded.load(out / "checkpoints", 1)
    restored = live_state(t)
    if t.acc.is_main_process:
        for part in ("gen", "gui"):  # the second update moved both models away from the saved state
            assert any(not torch.equal(saved[part][k], changed[part][k]) for k in saved[part]), part
        for part in ("gen", "gui"):
            assert saved[part] and all(torch.equal(saved[part][k], restored[part][k]) for k in saved[part]), part
        for part in ("opt_gen", "opt_gui"):
            assert saved[part] and saved[part].keys() == restored[part].keys(), part
            for key, state in saved[part].items():
                assert all(torch.equal(torch.as_tensor(v), torch.as_tensor(restored[part][key][n]))
                           for n, v in state.items()), (part, key)
        (out / "ok").write_text("ok")

if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1], sys.argv[2] == "lora", Path(sys.argv[3]), sys.argv[4])
