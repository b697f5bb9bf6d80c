"""FSDP2 on two gloo processes in each precision: the guidance blocks mix a frozen fp16/bf16
teacher with fp32 LoRA weights (FSDP1's flattening refused that), one real update of each
model, sharded save, restore, and the files that `dmdr export` and the adapters read."""
import copy
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from helpers_train import REPO, env

from dmdr.models import sdxl

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _adapter(state: dict) -> dict:
    return {k.replace(f".{sdxl.ADAPTER}.", "."): v for k, v in state.items() if ".lora_" in k}


@pytest.mark.parametrize("mode,gen", [("no", "lora"), ("fp16", "full"), ("bf16", "lora")])
def test_fsdp_two_processes(tmp_path, mode, gen):
    cache = tmp_path / "cache"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
           str(REPO / "tests" / "helpers_fsdp.py"), mode, gen, str(tmp_path), str(cache)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env(cache), cwd=REPO)
    assert proc.returncode == 0 and (tmp_path / "ok").is_file(), proc.stdout[-3000:] + proc.stderr[-6000:]

    live = torch.load(tmp_path / "live.pt", weights_only=True)
    ck = tmp_path / "checkpoints"
    for part in ("accelerator_1", "accelerator_2"):  # one shard file per rank
        assert sorted(p.name for p in (ck / part / "step-1" / "sharded").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    gui = load_file(str(ck / "lora_gui" / "step-1" / "adapter_model.safetensors"))
    assert gui.keys() == _adapter(live["gui"]).keys()
    assert all(torch.equal(gui[k], v) for k, v in _adapter(live["gui"]).items())
    if gen == "lora":
        lora = load_file(str(ck / "lora_gen" / "step-1" / "adapter_model.safetensors"))
        assert lora and all(torch.equal(lora[k], v) for k, v in _adapter(live["gen"]).items())
    else:  # what `dmdr export` does: one process consolidates the generator from the shards
        from dmdr import fsdp

        unet = copy.deepcopy(sdxl.load_sdxl(sdxl.resolve_pretrained("builtin:tiny", cache)).unet)
        fsdp.load_full_model(unet, ck / "accelerator_1" / "step-1")
        state = unet.state_dict()
        assert state.keys() == live["gen"].keys()
        assert all(torch.equal(state[k], v) for k, v in live["gen"].items())
