"""`dmdr ls` and `dmdr pull`: look at runs in the object store and download checkpoints.

The main CLI calls `add_parsers(subparsers)` and dispatches ``ls`` to `run_ls(args)` and
``pull`` to `run_pull(args)`; both return an exit code and raise UserError for user mistakes.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dmdr.errors import UserError
from dmdr.storage.hashio import human_size
from dmdr.storage.layout import ONLY_GROUPS, RUN_FILES, verification  # light; the boto3 modules load in the commands


def add_s3_options(parser: argparse.ArgumentParser) -> None:
    """The connection flags shared with `dmdr train` (credentials come from the AWS chain)."""
    group = parser.add_argument_group("object storage")
    group.add_argument("--s3-endpoint-url", default=None,
                       help="custom S3 endpoint (MinIO, Ceph, R2); default: AWS_ENDPOINT_URL or AWS")
    group.add_argument("--s3-region", default=None, help="region (default: AWS chain, then us-east-1)")
    group.add_argument("--s3-path-style", action="store_true", help="path-style addressing (MinIO/Ceph)")
    group.add_argument("--s3-profile", default=None, help="AWS profile name (default: AWS_PROFILE)")
    group.add_argument("--s3-timeout", type=_positive(float), default=INTERACTIVE_TIMEOUT, metavar="SECONDS",
                       help=f"connect and read timeout per request (default {INTERACTIVE_TIMEOUT:.0f})")
    group.add_argument("--s3-retries", type=_positive(int), default=INTERACTIVE_RETRIES, metavar="N",
                       help=f"retries per failed request (default {INTERACTIVE_RETRIES}); each is announced on stderr")


# Interactive commands give up on a silent store in about half a minute (3 attempts x 10 s), not minutes.
INTERACTIVE_TIMEOUT, INTERACTIVE_RETRIES = 10.0, 2


def _positive(tp: type):
    def parse(text: str):
        try:
            value = tp(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not value > 0 or value == float("inf"):
            raise argparse.ArgumentTypeError(f"{text!r} must be a positive finite number")
        return value

    parse.__name__ = tp.__name__
    return parse


def config_from_args(args: argparse.Namespace, uri: str) -> StorageConfig:
    """A StorageConfig for `uri` from the flags of `add_s3_options`."""
    from dmdr.storage.client import StorageConfig

    return StorageConfig(s3_uri=uri, endpoint_url=args.s3_endpoint_url, region=args.s3_region,
                         path_style=args.s3_path_style, profile=args.s3_profile, retries=args.s3_retries,
                         connect_timeout=args.s3_timeout, read_timeout=args.s3_timeout, announce_retries=True)


def add_parsers(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``ls`` and ``pull`` subcommands."""
    ls = subparsers.add_parser("ls", help="list runs under a prefix, or the checkpoints of a run",
                               description="List runs under s3://BUCKET/PREFIX, or the checkpoints "
                                           "(step, size, complete or not) of s3://BUCKET/PREFIX/EXP.")
    ls.add_argument("uri", help="s3://bucket/prefix or s3://bucket/prefix/exp")
    ls.add_argument("--check-write", action="store_true",
                    help="first write and delete a small probe object under the prefix, as a training "
                         "run does at start: a read-only or wrong credential fails here (`helm test`)")
    add_s3_options(ls)
    pull = subparsers.add_parser("pull", help="download a checkpoint of a run, verified",
                                 description="Download one checkpoint of s3://BUCKET/PREFIX/EXP, with the "
                                             "run's args.json and loss logs, into DEST (laid out like the "
                                             "run's own directory: `dmdr sample/export --run DEST` use it).")
    pull.add_argument("uri", help="s3://bucket/prefix/exp")
    pull.add_argument("--step", default="latest", help="'latest' (default) or a step number")
    pull.add_argument("--dest", required=True, type=Path, help="local directory (the experiment dir)")
    pull.add_argument("--only", default="all", choices=list(ONLY_GROUPS),
                      help="all files (resume), only the generator's weights (sample/export), "
                           "or only the LoRA adapters")
    add_s3_options(pull)


def run_ls(args: argparse.Namespace) -> int:
    """Print the checkpoints of a run, or the runs under a prefix."""
    from dmdr.storage.remote import list_checkpoints, list_runs

    cfg = config_from_args(args, args.uri)
    if args.check_write:
        from dmdr.storage.client import preflight

        preflight(cfg, check_write=True, timeout=args.s3_timeout)
        print(f"{args.uri}: reachable, credentials accepted, writable")
    checkpoints = list_checkpoints(args.uri, cfg)
    if checkpoints:
        print(f"{args.uri}")
        print(f"{'STEP':>10}  {'SIZE':>10}  STATUS")
        for ckpt in checkpoints:
            status = "DAMAGED" if ckpt.damaged else "complete" if ckpt.complete else "incomplete"
            print(f"{ckpt.step:>10}  {human_size(ckpt.size):>10}  {status}{'  (latest)' if ckpt.latest else ''}")
        for ckpt in checkpoints:
            if ckpt.damaged:
                print(f"step {ckpt.step} is damaged: {ckpt.damaged}; resume skips it: delete that manifest "
                      "or re-upload the checkpoint", file=sys.stderr)
        return 0
    runs = list_runs(args.uri, cfg)
    if not runs:
        print(f"No runs or checkpoints under {args.uri}.")
        return 0
    print(f"{'RUN':<40}  LATEST")
    for run in runs:
        print(f"{run.name:<40}  {run.latest_step if run.latest_step is not None else '-'}")
    return 0


def run_pull(args: argparse.Namespace) -> int:
    """Download `--step` of a run into `--dest`, verifying every file, with the run's args.json
    and loss logs: `dmdr sample`/`export`/`plot --run DEST` then work on DEST."""
    from dmdr.storage.remote import download_checkpoint, download_run_files, require_latest

    if args.dest.exists() and not args.dest.is_dir():
        raise UserError(f"--dest {args.dest} is a file, not a folder: give the experiment folder to pull into.")
    cfg = config_from_args(args, args.uri)
    if args.step == "latest":
        step = require_latest(args.uri, cfg)
    else:
        try:
            step = int(args.step)
        except ValueError:
            raise UserError(f"--step '{args.step}' is not 'latest' or a step number.") from None
    manifest = download_checkpoint(args.uri, step, args.dest, only=args.only, cfg=cfg)
    got = download_run_files(args.uri, args.dest, RUN_FILES, cfg)
    if "args.json" not in got:
        print(f"warning: {args.uri}/args.json is missing: `dmdr sample`/`export` need the run's configuration "
              f"there; copy it into {args.dest}", file=sys.stderr)
    print(f"Pulled step {step} ({len(manifest.files)} files, {human_size(manifest.size)}, {verification(manifest)}) "
          f"into {args.dest}")
    return 0
