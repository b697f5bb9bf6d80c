"""`dmdr export`: the trained generator in the formats people use it in.

One module per format, each with a function ``write(source, out, dtype)`` given an `ExportSource`
(the run's config, the loaded generator and its sampling timesteps), optionally ``LAST``, the file
of a folder export that is uploaded last (its presence in the store means the folder is whole), and
optionally ``check(cfg, **options)``, which refuses options the run cannot take before anything loads,
``check_out(out)``, its rule for ``--out`` (checked before anything is pulled or loaded), and ``HOW_TO_LOAD``,
which the CLI prints after the export:

    diffusers_unet  a diffusers UNet2DConditionModel folder plus dmdr_export.json (`--format diffusers`)
    lora            the generator LoRA in the diffusers and kohya formats (`--format lora`)
    single_file     one SDXL .safetensors in the original key layout with the base VAE and text encoders
                    (`--format single-file`)

`export()` loads the checkpoint once and hands it to the chosen format. The run can be an `s3://`
run (one checkpoint is pulled into the cache, verified) and the output an `s3://` key (written
locally first, then uploaded).
"""
from __future__ import annotations

import functools
import importlib
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from dmdr.storage.uri import S3Uri, is_s3_uri

if TYPE_CHECKING:
    import torch

    from dmdr.config import TrainConfig
    from dmdr.models.sdxl import SDXLParts
    from dmdr.storage.client import StorageConfig

#: ``--format`` name -> the module (in this package) that writes it.
_MODULES = {"diffusers": "diffusers_unet", "lora": "lora", "single-file": "single_file"}
FORMATS = tuple(_MODULES)
DEFAULT_CACHE = "~/.cache/dmdr"
DTYPES = ("fp32", "fp16", "bf16")


def torch_dtype(name: str) -> "torch.dtype":
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


@dataclass
class ExportSource:
    """A checkpoint loaded for export: the run's config and directory, the checkpoint step, the SDXL
    parts it was trained from (teacher UNet, VAE, text encoders), the generator UNet (with its LoRA,
    if any, unmerged) and the sampling timesteps (one per generator step)."""

    cfg: "TrainConfig"
    run_dir: Path
    step: int
    parts: "SDXLParts"
    unet: "torch.nn.Module"
    timesteps: list[int]

    @property
    def conditioning_timestep(self) -> int:
        """One step: the timestep the generator was trained at (a --generator-timesteps list's entry)."""
        return self.timesteps[0] if len(self.timesteps) == 1 else self.cfg.conditioning_timestep


def base_model_name(spec: str) -> str:
    """The base model as an export records it: a hub id or builtin name as is, a URI without
    credentials, a local folder by its name only (no path of the training machine)."""
    if "://" in spec:
        from dmdr.redact import redact

        return redact(spec)
    if spec.startswith(("/", "~", ".")) or Path(spec).expanduser().exists():
        return Path(spec).name
    return spec


def load_hint(fmt: str) -> str | None:
    """How to load an export of format `fmt`, where its module says (the CLI prints it)."""
    return getattr(importlib.import_module(f"dmdr.exports.{_MODULES[fmt]}"), "HOW_TO_LOAD", None)


def load_source(run_dir: Path, step: str, overrides: dict | None = None,
                check: Callable[["TrainConfig"], None] | None = None) -> ExportSource:
    """Load checkpoint ``step`` ('latest' or a number) of the run in ``run_dir`` on the CPU; ``check(cfg)``
    first refuses options the run's config cannot take (before the models load)."""
    import torch

    from dmdr import inference

    cfg = inference.load_run_config(run_dir, overrides)
    if check is not None:
        check(cfg)
    ckpt_step = inference.find_checkpoint(run_dir, step)
    parts, unet = inference.load_generator(cfg, run_dir, ckpt_step, torch.device("cpu"))
    steps = [int(t) for t in inference.sampling_grid(cfg)[:-1].tolist()]
    return ExportSource(cfg, run_dir, ckpt_step, parts, unet, steps)


def export(run: str | Path, step: str, out: str | Path, *, fmt: str = "diffusers", dtype: str = "fp16",
           overrides: dict | None = None, s3: Callable[[str], "StorageConfig"] | None = None,
           extract_lora: int | None = None) -> str:
    """Export checkpoint ``step`` of the run ``run`` (a directory or an ``s3://`` run) to ``out`` (a local
    path or an ``s3://`` key) in format ``fmt`` and precision ``dtype``; returns where it went.
    ``s3(uri)`` gives the storage settings for an ``s3://`` URI; ``extract_lora`` the rank of a LoRA
    extracted from a full fine-tune (`--format lora` only)."""
    if fmt not in _MODULES:
        raise ValueError(f"unknown export format {fmt!r}; one of {FORMATS}")
    options = {} if extract_lora is None else {"extract_lora": extract_lora}
    if options and fmt != "lora":
        from dmdr.errors import UserError

        raise UserError(f"--extract-lora is an option of --format lora, not of --format {fmt}")
    writer = importlib.import_module(f"dmdr.exports.{_MODULES[fmt]}")
    check = getattr(writer, "check", None)
    check = None if check is None else functools.partial(check, **options)
    run, out = str(run), str(out)
    if hasattr(writer, "check_out"):  # before the (slow) pull and load
        writer.check_out(Path(out))
    if is_s3_uri(run):
        from dmdr.storage import staging

        cache = Path((overrides or {}).get("cache_dir") or DEFAULT_CACHE)
        run_dir, step = staging.local_run(run, step, cache, _storage(s3, run))
    else:
        run_dir = Path(run)
    if not is_s3_uri(out):
        source = load_source(run_dir, step, overrides, check)
        return str(writer.write(source, Path(out), dtype, **options))
    name = S3Uri.parse(out).name
    if not name:
        from dmdr.errors import UserError

        raise UserError(f"--out {out} names a bucket, not a key: write s3://BUCKET/PATH/NAME")
    cfg = _storage(s3, out)
    source = load_source(run_dir, step, overrides, check)
    with tempfile.TemporaryDirectory(prefix="dmdr-export-") as tmp:
        from dmdr.storage import staging

        local = writer.write(source, Path(tmp) / name, dtype, **options)
        staging.upload(Path(local), out, cfg, last=getattr(writer, "LAST", None))
    return out


def _storage(s3: Callable[[str], "StorageConfig"] | None, uri: str) -> "StorageConfig":
    if s3 is not None:
        return s3(uri)
    from dmdr.storage.client import StorageConfig

    return StorageConfig(s3_uri=uri)
