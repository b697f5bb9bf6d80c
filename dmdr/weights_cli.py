"""`dmdr weights fetch|verify|list`: the command line of `dmdr.weights` (also run as
``python -m dmdr.weights ...`` in the image's build stage, with only the fetcher's files)."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

from dmdr.errors import UserError
from dmdr.storage.hashio import human_size
from dmdr.weights import (DEFAULT_MANIFEST, fetch_weights, load_manifest, parse_groups, read_lock,
                          set_hf_token_file, verify_weights)


def _default_dest() -> str | None:
    return os.environ.get("DMDR_WEIGHTS_DIR")


def add_parsers(subparsers: Any) -> None:
    """Add ``weights fetch|verify|list`` to the ``dmdr`` sub-command parsers."""
    weights = subparsers.add_parser("weights", help="fetch or verify model weights from a manifest",
                                    description="Weights from a YAML manifest (default: the one shipped with "
                                                "dmdr, dmdr/assets/weights.yaml).")
    sub = weights.add_subparsers(dest="weights_command", required=True)

    p = sub.add_parser("fetch", help="download the entries of some groups into a folder")
    p.add_argument("--manifest", help="weights manifest YAML (default: the one shipped with dmdr)")
    p.add_argument("--dest", default=_default_dest(), help="destination folder (default $DMDR_WEIGHTS_DIR)")
    p.add_argument("--groups", help="comma-separated groups, 'all' or 'none' (default: the manifest's default_groups)")
    p.add_argument("--cache-dir", help="download cache; partial downloads resume from it (default <dest>/.fetch-cache)")
    p.add_argument("--hf-token-file", help="file with a Hugging Face token (default $HF_TOKEN_FILE or "
                   "/run/secrets/hf_token when present)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run_fetch)

    p = sub.add_parser("verify", help="check a weights folder (sha256 and sizes)")
    p.add_argument("--manifest", help="weights manifest YAML (default: the record written by fetch)")
    p.add_argument("--dest", default=_default_dest(), help="weights folder (default $DMDR_WEIGHTS_DIR)")
    p.add_argument("--groups", help="comma-separated groups or 'all' (default: the manifest's default_groups)")
    p.set_defaults(func=run_verify)

    p = sub.add_parser("list", help="the groups and entries of a manifest, with sizes and sha256")
    p.add_argument("--manifest", help="weights manifest YAML (default: the one shipped with dmdr)")
    p.set_defaults(func=run_list)


def _need_dest(args: argparse.Namespace) -> Path:
    if not args.dest:
        raise UserError("No destination: pass --dest or set $DMDR_WEIGHTS_DIR.")
    return Path(args.dest)


def run_fetch(args: argparse.Namespace) -> int:
    """``dmdr weights fetch``: download, verify and place; prints one line per entry."""
    set_hf_token_file(args.hf_token_file)
    manifest = load_manifest(args.manifest or DEFAULT_MANIFEST)
    dest = _need_dest(args)
    groups = parse_groups(args.groups)
    paths = fetch_weights(manifest, dest, groups, cache_dir=args.cache_dir,
                          progress=False if args.no_progress else None)
    lock = read_lock(dest)
    for p in paths:
        r = lock[p.relative_to(dest).as_posix()]
        print(f"{p}\t{r['size']}\tsha256:{r['sha256']}\t{r['source']}")
    return 0


def run_verify(args: argparse.Namespace) -> int:
    """``dmdr weights verify``: one OK line per entry, or a UserError naming each bad entry."""
    manifest = load_manifest(args.manifest) if args.manifest else None
    dest = _need_dest(args)
    checks = verify_weights(dest, manifest, parse_groups(args.groups))
    for c in checks:
        print(f"OK\t{dest / c.name}\t{c.size}\tsha256:{c.sha256}")
    return 0


def run_list(args: argparse.Namespace) -> int:
    """``dmdr weights list``: entries by group with size, sha256 and first source; a legend
    explains the markers."""
    manifest = load_manifest(args.manifest or DEFAULT_MANIFEST)
    print(f"manifest: {manifest.path}")
    print(f"  {'GROUP':<14} {'NAME':<48} {'SIZE':>9}  {'SHA256':<64}  SOURCE")
    for e in manifest.entries:
        mark = "*" if e.group in manifest.default_groups else " "
        size = human_size(e.size) if e.size is not None else "?"
        print(f"{mark} {e.group:<14} {e.name:<48} {size:>9}  {e.sha256 or '-':<64}  {e.sources[0]}")
    print(f"* = a default group ({', '.join(manifest.default_groups) or 'none'}): fetched when --groups is not "
          "given. SIZE ? = not pinned in the manifest; SHA256 - = not pinned (a folder, or a file checked only "
          "against the record of its fetch).")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m dmdr.weights fetch|verify|list ...`` (the same as ``dmdr weights ...``)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    parser = argparse.ArgumentParser(prog="dmdr")
    add_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["weights", *(sys.argv[1:] if argv is None else argv)])
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"dmdr weights: error: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
