"""``--distributed fsdp``: torch's FSDP2 (``fully_shard``) on the generator and the guidance model,
and their sharded checkpoints (torch.distributed.checkpoint, DCP).

Why not accelerate's FSDP plugin: accelerate enables it only on GPUs, and FSDP1 flattens each
wrapped block into one tensor, which fails on the guidance blocks where the frozen teacher
weights are fp16/bf16 and the LoRA weights fp32 ("Must flatten tensors with uniform dtype").
FSDP2 shards every parameter on its own, so mixed dtypes coexist; it runs on CPU (gloo) and
CUDA (NCCL) alike. Accelerate keeps what it does for DDP: autocast, the fp16 GradScaler (which
reduces its inf check across ranks for sharded gradients), the optimiser/scheduler wrappers,
gradient clipping (DTensor-aware), RNG and scheduler state in the checkpoint.

Checkpoint parts under ``accelerator_1|2/step-N/``: accelerate's files (scheduler, RNG, scaler)
plus ``sharded/``, the DCP shards of the model's trainable weights (the full generator, or only
LoRA weights where the base is frozen) and its optimiser state, one file per rank. ``lora_gui``
and ``lora_gen`` hold the adapters gathered to full tensors, as without FSDP. ``dmdr export``
consolidates a full generator from the shards (:func:`load_full_model`), so a checkpoint never
holds a second, consolidated copy of the 2.6 B-parameter UNet.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch

from dmdr.errors import UserError

BLOCKS = ("BasicTransformerBlock", "ResnetBlock2D")  # one FSDP unit each, then the root
SHARDS = "sharded"
LOW_PRECISION = {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def _mesh(device: torch.device):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if not dist.is_initialized():  # one process: accelerate starts no process group, FSDP needs one
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(),
                                rank=0, world_size=1)
    return init_device_mesh(device.type, (dist.get_world_size(),))


def shard(model: torch.nn.Module, mixed_precision: str) -> torch.nn.Module:
    """Shard ``model`` in place (each BasicTransformerBlock/ResnetBlock2D, then the rest) over
    all processes. Blocks are gathered in the training precision (halving the all-gather
    traffic of fp32 weights); gradients are reduced in fp32; each parameter keeps its own dtype."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = _mesh(next(model.parameters()).device)
    policy = MixedPrecisionPolicy(param_dtype=LOW_PRECISION[mixed_precision], reduce_dtype=torch.float32)
    for module in list(model.modules()):
        if type(module).__name__ in BLOCKS:
            fully_shard(module, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def prepare(acc, model: torch.nn.Module, optimizer, scheduler) -> tuple:
    """``acc.prepare`` of a model with its optimiser and scheduler; a sharded model (an
    FSDPModule) is already distributed and is left as it is (accelerate would add DDP)."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, FSDPModule):
        return (model, *acc.prepare(optimizer, scheduler))
    return acc.prepare(model, optimizer, scheduler)


def _options(full: bool = False, strict: bool = True):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # frozen weights (the teacher, a LoRA generator's base) are rebuilt from the pretrained model
    return StateDictOptions(ignore_frozen_params=True, full_state_dict=full, cpu_offload=full, strict=strict)


def _raw(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    return getattr(optimizer, "optimizer", optimizer)  # under accelerate's AcceleratedOptimizer


class ShardedState:
    """Saves and restores the sharded models and optimisers; every rank must call each method."""

    def __init__(self, acc_gen, gen, opt_gen, acc_gui, gui, opt_gui, lora_gen: bool):
        self.parts = (("accelerator_1", acc_gen, gen, opt_gen), ("accelerator_2", acc_gui, gui, opt_gui))
        self.lora_gen = lora_gen

    @contextmanager
    def accelerate_state(self):
        """Around accelerate's save_state/load_state: it would pickle rank 0's optimiser shard
        as the whole state (the optimisers go through DCP instead). accelerate has no switch
        for this, so its optimiser list is emptied for the call (accelerate is pinned)."""
        saved = [(acc, acc._optimizers) for _, acc, _, _ in self.parts]
        for acc, _ in saved:
            acc._optimizers = []
        try:
            yield
        finally:
            for acc, optimizers in saved:
                acc._optimizers = optimizers

    def save(self, ckpt_dir: Path, step: int) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

        from dmdr.models import sdxl

        for part, _, model, optimizer in self.parts:
            model_sd, optim_sd = get_state_dict(model, _raw(optimizer), options=_options())
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=ckpt_dir / part / f"step-{step}" / SHARDS)
        adapters = [("lora_gui", self.parts[1][2])] + ([("lora_gen", self.parts[0][2])] if self.lora_gen else [])
        for name, model in adapters:  # gathered on every rank, written by rank 0
            full = get_model_state_dict(model, options=_options(full=True))
            if self.parts[0][1].is_main_process:
                sdxl.save_lora(model, ckpt_dir / name / f"step-{step}", state=full)

    def load(self, ckpt_dir: Path, step: int) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        for part, _, model, optimizer in self.parts:
            path = ckpt_dir / part / f"step-{step}" / SHARDS
            if not path.is_dir():
                raise UserError(f"{path} is missing: checkpoint step-{step} was not written with --distributed fsdp; "
                                "resume with the --distributed it was trained with")
            model_sd, optim_sd = get_state_dict(model, _raw(optimizer), options=_options())
            state = {"model": model_sd, "optim": optim_sd}
            dcp.load(state, checkpoint_id=path)
            # not strict: the frozen weights are not in the state (dcp.load has checked every key it asked for)
            set_state_dict(model, _raw(optimizer), model_state_dict=state["model"],
                           optim_state_dict=state["optim"], options=_options(strict=False))


def has_shards(step_dir: Path) -> bool:
    return (step_dir / SHARDS).is_dir()


def load_full_model(model: torch.nn.Module, step_dir: Path) -> None:
    """Fill an unsharded ``model`` from the DCP shards of ``step_dir`` (any number of writer
    ranks), in one process: how ``dmdr export``/``dmdr sample`` read an FSDP generator."""
    import torch.distributed.checkpoint as dcp

    state = {"model": model.state_dict()}
    dcp.load(state, checkpoint_id=step_dir / SHARDS, no_dist=True)
    model.load_state_dict(state["model"], strict=True)
