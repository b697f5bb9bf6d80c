"""The ``dmdr`` command: train, sample, export, score, plot, demo (and storage/weights commands as they land)."""
from __future__ import annotations

import argparse
import errno
import os
import sys
from pathlib import Path

from dmdr.errors import UserError


def _train(args: argparse.Namespace) -> int:
    from dmdr.config import build_config

    flags = {k: v for k, v in vars(args).items() if k not in ("command", "func")}
    cfg = build_config(flags)  # bad values fail here, before the heavy imports
    from dmdr.train import train

    status = train(cfg)
    if _is_main_rank():
        print(f"outputs: {cfg.run_dir}", flush=True)
    return status


def _sample(args: argparse.Namespace) -> int:
    from dmdr import data, inference

    prompts = list(args.prompt or [])
    if args.prompts:
        prompts += data.load_prompt_list(args.prompts)
    if not prompts:
        prompts = list(data.SAMPLE_PROMPTS)
    paths = inference.sample_to_dir(Path(args.run), args.step, prompts, Path(args.out), args.seed, args.device,
                                    _overrides(args))
    for p, text in zip(paths, prompts):
        print(f"{p}\t{text}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from dmdr import exports
    from dmdr.storage.cli import config_from_args

    out = exports.export(args.run, args.step, args.out, fmt=args.format, dtype=args.dtype,
                         overrides=_overrides(args), s3=lambda uri: config_from_args(args, uri),
                         extract_lora=args.extract_lora)
    print(f"exported generator ({args.format}, {args.dtype}): {out}")
    if hint := exports.load_hint(args.format):
        print(hint)
    return 0


def add_run_overrides(p: argparse.ArgumentParser) -> None:
    """Paths in a run's args.json that name the training machine, replaceable on this one."""
    p.add_argument("--pretrained-model", default=None,
                   help="base SDXL model (default: the run's, from args.json): a local diffusers folder, "
                        "a hub id or builtin:tiny")
    p.add_argument("--cache-dir", default=None, help="cache for built-in models and fetched inputs "
                                                     "(default: the run's, from args.json)")


def _overrides(args: argparse.Namespace) -> dict:
    return {"pretrained_model": args.pretrained_model, "cache_dir": args.cache_dir}


def _is_main_rank() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("dmdr")
    except PackageNotFoundError:  # run from a source tree that is not installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    """The whole command line. It imports only light modules (no torch, numpy or boto3): each
    command imports what it needs when it runs, so `dmdr --help` answers at once."""
    from dmdr import config, demo, exports, plot, score, weights_cli
    from dmdr.evaluation import cli as eval_cli
    from dmdr.storage import cli as storage_cli

    parser = argparse.ArgumentParser(prog="dmdr", description="DMDR: one-step SDXL distillation with rewards.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train (under torchrun or accelerate launch for several processes)",
                       description="Train a DMDR generator. Precedence: flag > --config > --preset > defaults.")
    config.add_arguments(p)
    p.set_defaults(func=_train)

    p = sub.add_parser("sample", help="images from a checkpoint of a run, or from a `dmdr export` folder")
    p.add_argument("--run", required=True, help="run directory (<output-dir>/<exp-name>), or a `dmdr export` folder "
                                                "(then --pretrained-model names its SDXL base)")
    p.add_argument("--step", default="latest", help="checkpoint step or 'latest' (of a run)")
    p.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    p.add_argument("--prompts", help="file with one prompt per line")
    p.add_argument("--out", required=True, help="output folder for PNGs")
    p.add_argument("--seed", type=int, default=2026)
    p.add_argument("--device", default="cpu")
    add_run_overrides(p)
    p.set_defaults(func=_sample)

    p = sub.add_parser("export", help="the generator in a format people load (diffusers UNet folder, SDXL single file)")
    p.add_argument("--run", required=True, help="run directory (<output-dir>/<exp-name>), or an s3:// run "
                                                "(s3://BUCKET/PREFIX/EXP: the checkpoint is pulled into --cache-dir)")
    p.add_argument("--step", default="latest", help="checkpoint step or 'latest'")
    p.add_argument("--out", required=True, help="the output (a folder; single-file: a .safetensors file), "
                                                "or an s3:// key to upload it to")
    p.add_argument("--format", default="diffusers", choices=exports.FORMATS,
                   help="diffusers: a UNet2DConditionModel folder (safetensors) plus dmdr_export.json; lora: the "
                        "generator LoRA for diffusers (pytorch_lora_weights.safetensors) and A1111/ComfyUI "
                        "(<out>_kohya.safetensors); single-file: one SDXL .safetensors in the original key layout "
                        "(ComfyUI, A1111, from_single_file), the generator with the base model's VAE and text "
                        "encoders [default: diffusers]")
    p.add_argument("--extract-lora", type=int, default=None, metavar="RANK",
                   help="--format lora of a full fine-tune: a rank-RANK LoRA of its difference to the base "
                        "(truncated SVD; the error is printed and recorded in dmdr_export.json)")
    p.add_argument("--dtype", default="fp16", choices=exports.DTYPES,
                   help="precision of the saved weights [default: fp16, the size people download]")
    add_run_overrides(p)
    storage_cli.add_s3_options(p)
    p.set_defaults(func=_export)

    score.add_parser(sub)
    eval_cli.add_parser(sub)
    plot.add_parser(sub)
    demo.add_parser(sub)
    storage_cli.add_parsers(sub)
    sub.choices["ls"].set_defaults(func=storage_cli.run_ls)
    sub.choices["pull"].set_defaults(func=storage_cli.run_pull)
    weights_cli.add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        from dmdr.redact import redact

        print(f"dmdr {args.command}: error: {redact(str(e))}", file=sys.stderr, flush=True)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    except OSError as e:  # the disk refused a write (read-only, full, quota): one line, not a traceback
        if e.filename is None or e.errno not in _DISK_ERRNOS:
            raise
        print(f"dmdr {args.command}: error: {e.strerror}: {e.filename}; make that place writable "
              "(or free space there) and run again", file=sys.stderr, flush=True)
        return 2


_DISK_ERRNOS = {errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.ENOTDIR,
                errno.EEXIST}


if __name__ == "__main__":
    sys.exit(main())
