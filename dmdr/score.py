"""`dmdr score`: score a folder of images against their prompts with the reward models.

Images are taken in name order and paired with the prompt file line by line. Prints one line per
image and the means (HPS also x100, as papers report it) and writes a JSON report (by default
``scores.json`` in the images folder); an ``--out`` ending in ``.csv`` writes a CSV too, with the
JSON next to it.

    dmdr score --images DIR --prompts FILE --hpsv2-reward-model HPS_v2.1_compressed.pt
    python -m dmdr.score --images DIR --prompts FILE --clip-reward-model Apple_CLIP-H-14-224.bin
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

from statistics import fmean
from typing import TYPE_CHECKING

from dmdr.errors import UserError
from dmdr.reward_kinds import KINDS

if TYPE_CHECKING:  # torch and the reward models load in the command, not for `dmdr --help`
    import torch

    from dmdr.rewards import RewardSet, RewardSpec

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
DESCRIPTION = (
    "Score images against their prompts: images sorted by name, one prompt per line. Prints "
    "per-image scores and means (HPS also x100) and writes a JSON report (scores.json in the "
    "images folder, or --out; a CSV too for --out *.csv). Reward models load from local files only."
)
DTYPES = ("float32", "bfloat16", "float16")  # names of torch dtypes


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``score`` subcommand to an argparse subparsers object; sets ``func=run``."""
    p = subparsers.add_parser(
        "score",
        help="score images against their prompts with the CLIP and HPSv2.1 rewards",
        description=DESCRIPTION,
    )
    p.add_argument("--images", required=True, help="folder of images (png, jpg, webp), sorted by name")
    p.add_argument("--prompts", required=True, help="text file, one prompt per line, in image order")
    p.add_argument("--clip-reward-model", help=f"CLIP reward checkpoint ({KINDS['clip'].file_name})")
    p.add_argument("--hpsv2-reward-model", help=f"HPSv2.1 checkpoint ({KINDS['hps'].file_name})")
    p.add_argument("--clip-reward-arch", default=KINDS["clip"].default_arch,
                   help="open_clip model name or model-config JSON of the CLIP reward (default: %(default)s)")
    p.add_argument("--hps-reward-arch", default=KINDS["hps"].default_arch,
                   help="open_clip model name or model-config JSON of HPSv2.1 (default: %(default)s)")
    p.add_argument("--magic-prompt", default=None,
                   help="text put before each prompt for HPS only (training uses 'Realistic photo'; "
                        "default: none, as in the HPSv2 benchmark)")
    p.add_argument("--out", default=None,
                   help="report path, .json or .csv (a .csv also writes the .json next to it; "
                        "default: scores.json in the --images folder)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="default: cuda when available, else cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="model dtype")
    p.add_argument("--batch-size", type=int, default=8)
    p.set_defaults(func=run)
    return p


def list_images(directory: Path) -> list[Path]:
    """The image files directly in ``directory``, sorted by name."""
    if not directory.is_dir():
        raise UserError(f"--images {directory}: not a folder of images.")
    files = sorted(p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UserError(f"--images {directory}: no {'/'.join(IMAGE_SUFFIXES)} files in it.")
    return files


def read_prompts(path: Path) -> list[str]:
    """One prompt per line; trailing empty lines are ignored."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--prompts {path}: cannot read it as UTF-8 text ({e}).") from e
    while lines and not lines[-1].strip():
        lines.pop()
    return lines


def load_image(path: Path) -> torch.Tensor:
    """An RGB image as a [3,H,W] float tensor in [0,1]."""
    import numpy as np
    import torch
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    except (OSError, UnidentifiedImageError) as e:
        raise UserError(f"--images: cannot read {path} as an image ({e}).") from e
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def score_files(
    files: list[Path], prompts: list[str], rewards: RewardSet, batch_size: int, device: str
) -> dict[str, list[float]]:
    """name -> per-image scores, batching images of equal size."""
    import torch

    out = {name: [0.0] * len(files) for name in rewards.names}
    for start in range(0, len(files), batch_size):
        index = range(start, min(start + batch_size, len(files)))
        images = {i: load_image(files[i]) for i in index}
        by_size: dict[tuple, list[int]] = {}
        for i, img in images.items():
            by_size.setdefault(tuple(img.shape), []).append(i)
        for idx in by_size.values():
            batch = torch.stack([images[i] for i in idx]).to(device)
            with torch.no_grad():
                scores = rewards.scores(batch, [prompts[i] for i in idx])
            for name, values in scores.items():
                for i, v in zip(idx, values.tolist()):
                    out[name][i] = v
    return out


def build_report(files: list[Path], prompts: list[str], scores: dict[str, list[float]],
                 specs: list[RewardSpec]) -> dict:
    """The JSON report: per-image rows, means and the models used."""
    rows = []
    for i, (f, prompt) in enumerate(zip(files, prompts)):
        row = {"file": f.name, "prompt": prompt}
        row.update({name: values[i] for name, values in scores.items()})
        rows.append(row)
    mean = {name: fmean(values) for name, values in scores.items()}
    if "hps" in scores:
        for row in rows:
            row["hps_x100"] = row["hps"] * 100
        mean["hps_x100"] = mean["hps"] * 100
    models = {s.name: {"path": s.path, "arch": s.arch_or_default, "prefix": s.prefix} for s in specs}
    return {"count": len(rows), "mean": mean, "images": rows, "models": models}


def write_report(report: dict, out: Path) -> list[Path]:
    """Write JSON (and CSV for a .csv ``out``); returns the written paths."""
    suffix = out.suffix.lower()
    if suffix not in (".json", ".csv"):
        raise UserError(f"--out {out}: use a path ending in .json or .csv.")
    out.parent.mkdir(parents=True, exist_ok=True)
    json_path = out.with_suffix(".json")
    json_path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    written = [json_path]
    if suffix == ".csv":
        columns = ["file", "prompt", *report["mean"]]
        with open(out, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(report["images"])
            writer.writerow({"file": "mean", "prompt": "", **report["mean"]})
        written.insert(0, out)
    return written


def _format(values: dict) -> str:
    parts = [f"{k}={v:.4f}" for k, v in values.items() if k in KINDS]
    if "hps_x100" in values:
        parts.append(f"hps_x100={values['hps_x100']:.2f}")
    return "  ".join(parts)


def run(args: argparse.Namespace) -> int:
    """Score the images; raises UserError on bad input (the CLI prints it and exits 2)."""
    import torch

    from dmdr.rewards import RewardSet, RewardSpec

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    specs = []
    if args.clip_reward_model:
        specs.append(RewardSpec("clip", args.clip_reward_model, arch=args.clip_reward_arch))
    if args.hpsv2_reward_model:
        specs.append(RewardSpec("hps", args.hpsv2_reward_model, arch=args.hps_reward_arch,
                                prefix=args.magic_prompt))
    if not specs:
        raise UserError("give --clip-reward-model and/or --hpsv2-reward-model.")
    if args.batch_size < 1:
        raise UserError(f"--batch-size {args.batch_size}: must be at least 1.")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available here; use --device cpu.")
    files = list_images(Path(args.images))
    prompts = read_prompts(Path(args.prompts))
    if len(files) != len(prompts):
        raise UserError(
            f"{len(files)} images in {args.images} but {len(prompts)} prompts in {args.prompts}: "
            "give one prompt per line, in the order of the sorted image names."
        )
    rewards = RewardSet(specs)
    rewards.check()
    rewards.load(args.device, getattr(torch, args.dtype))
    scores = score_files(files, prompts, rewards, args.batch_size, args.device)
    report = build_report(files, prompts, scores, specs)
    for row in report["images"]:
        print(f"{row['file']}  {_format(row)}")
    print(f"mean over {report['count']} images: {_format(report['mean'])}")
    for path in write_report(report, Path(args.out) if args.out else Path(args.images) / "scores.json"):
        print(f"wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point (``python -m dmdr.score ...``), same options as ``dmdr score``."""
    parser = argparse.ArgumentParser(prog="dmdr")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["score", *(sys.argv[1:] if argv is None else argv)])
    try:
        return args.func(args)
    except UserError as e:
        print(f"dmdr score: error: {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
