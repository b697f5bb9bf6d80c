"""`dmdr eval`: CLIP, HPSv2.1 and FID of a run's checkpoints, against the step.

    dmdr eval --run runs/exp --steps all --prompts eval.txt --metrics clip,hps,fid --ref-stats coco.npz
    dmdr eval --run s3://bucket/prefix/exp --steps all --prompts eval.txt --watch

Writes ``<run>/eval/metrics.jsonl`` (one row per step), ``metrics.csv`` and ``metrics.png``; for an
s3:// run they go back to the run's prefix after every step. torch, the models and boto3 load in
the command, not for `dmdr --help`.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from dmdr.errors import UserError

DEFAULT_CACHE = "~/.cache/dmdr/eval"


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``eval`` subcommand; sets ``func=run``."""
    from dmdr.cli import add_run_overrides
    from dmdr.reward_kinds import KINDS
    from dmdr.storage.cli import add_s3_options

    p = subparsers.add_parser(
        "eval", help="CLIP, HPSv2.1 and FID of a run's checkpoints, with a plot against the step",
        description="Sample each chosen checkpoint on a fixed prompt set with fixed seeds and compute the metrics; "
                    "one row per step in <run>/eval/metrics.jsonl (+ metrics.csv, metrics.png). Steps already "
                    "there with the same settings are skipped, so a killed eval continues where it stopped.")
    p.add_argument("--run", required=True, help="run directory, or s3://bucket/prefix/exp (checkpoints pulled "
                                                "one at a time, generator only; eval/ written back to the store)")
    p.add_argument("--steps", default="latest", help="latest (default), all, or steps separated by commas (500,1000); "
                                                     "--watch takes every step")
    p.add_argument("--prompts", required=True, help="file with one prompt per line (the evaluation prompts), or "
                                                   "builtin:prompts (64 shipped with dmdr)")
    p.add_argument("--metrics", default="clip,hps", help="comma-separated: clip, hps, fid (default: %(default)s)")
    p.add_argument("--num-images", type=int, default=None,
                   help="images per step (default: one per prompt; more cycle the prompts with new seeds)")
    p.add_argument("--ref-images", default=None, help="FID reference: a folder of images (its statistics are "
                                                      "saved to <run>/eval/fid-ref-stats.npz)")
    p.add_argument("--ref-stats", default=None, help="FID reference: an .npz with mu and sigma (ours, clean-fid's "
                                                     "or pytorch-fid's, from the same Inception)")
    p.add_argument("--inception", default="inception-2015-12-05.pt",
                   help="TorchScript FID Inception (weights group fid; a relative name is also looked up in "
                        "$DMDR_WEIGHTS_DIR) [default: %(default)s]")
    for name, flag in (("clip", "--clip-reward-model"), ("hps", "--hpsv2-reward-model")):
        p.add_argument(flag, default=None, help=f"{KINDS[name].file_name} (default: the run's, else that file "
                                                "name, also looked up in $DMDR_WEIGHTS_DIR)")
        p.add_argument(KINDS[name].arch_flag, default=None, help="architecture (default: the run's)")
    p.add_argument("--magic-prompt", default=None, help="text before each prompt for HPS (default: none, as "
                                                        "the HPSv2 benchmark)")
    p.add_argument("--vae", choices=("tiny", "full"), default=None,
                   help="decoder of the images (default: the run's --vae; full: SDXL's own VAE, for numbers to report)")
    p.add_argument("--seed", type=int, default=2026, help="base noise seed (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=8, help="images sampled and scored at a time (default: %(default)s)")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--watch", action="store_true",
                   help="keep evaluating each new complete checkpoint until the run's last step "
                        "(max_train_steps of its args.json) is evaluated, or --watch-timeout passes without one")
    p.add_argument("--poll-interval", type=float, default=30.0,
                   help="--watch: seconds between looks at the run, doubled while nothing new comes, up to "
                        "--max-poll-interval (default: %(default)s)")
    p.add_argument("--max-poll-interval", type=float, default=600.0, help="(default: %(default)s)")
    p.add_argument("--watch-timeout", type=float, default=6 * 3600.0,
                   help="--watch: give up after this many seconds without a new checkpoint (default: 6 h)")
    p.add_argument("--local-cache", default=DEFAULT_CACHE, help="where an s3:// run's files are pulled "
                                                                 "(default: %(default)s)")
    add_run_overrides(p)
    add_s3_options(p)
    p.set_defaults(func=run)
    return p


def settings_from_args(args: argparse.Namespace):
    """The `Settings` of the command line (bad values are UserErrors, before any model loads)."""
    from dmdr import data
    from dmdr.evaluation.run import Settings, parse_metrics

    metrics = parse_metrics(args.metrics)
    if args.prompts == "builtin:prompts":  # the small prompt file shipped with dmdr (the chart's default)
        from dmdr.train import data_path

        args.prompts = data_path(args.prompts)
    prompts = data.load_prompt_list(args.prompts)
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA device is available here; use --device cpu")
    return Settings(prompts=prompts, num_images=args.num_images or len(prompts), metrics=metrics, seed=args.seed,
                    batch_size=args.batch_size, device=device,
                    reward_models={"clip": args.clip_reward_model, "hps": args.hpsv2_reward_model},
                    reward_archs={"clip": args.clip_reward_arch, "hps": args.hps_reward_arch},
                    magic_prompt=args.magic_prompt, inception=args.inception, vae=args.vae,
                    ref_stats=args.ref_stats, ref_images=args.ref_images)


def open_run(args: argparse.Namespace):
    """The run to evaluate; one that has not started (no args.json) is an error unless --watch waits for it."""
    from dmdr.evaluation.source import LocalRun, S3Run
    from dmdr.storage.uri import is_s3_uri

    if is_s3_uri(args.run):
        from dmdr.storage.cli import config_from_args

        source = S3Run(args.run, config_from_args(args, args.run), Path(args.local_cache))
    else:
        source = LocalRun(Path(args.run))
    if not source.refresh() and not args.watch:
        raise UserError(f"{args.run} has no args.json: pass a run written by `dmdr train` (check an s3:// URI "
                        "with `dmdr ls`), or add --watch to wait for a run that is starting")
    return source


def run(args: argparse.Namespace) -> int:
    """`dmdr eval`: the chosen steps once, or (--watch) every new one until the run ends."""
    from dmdr.evaluation.run import Evaluator, evaluate_run

    if args.ref_images and args.ref_stats:
        raise UserError("give one FID reference: --ref-images DIR or --ref-stats FILE.npz, not both")
    settings = settings_from_args(args)
    evaluator = Evaluator(settings, log=lambda line: print(line, flush=True))
    source = open_run(args)
    overrides = {"pretrained_model": args.pretrained_model, "cache_dir": args.cache_dir, "vae": args.vae}
    if not args.watch:
        done = evaluate_run(source, args.steps, evaluator, overrides)
        print(f"evaluated {len(done)} step(s); metrics in {source.where}/eval/metrics.jsonl", flush=True)
        return 0
    return watch(source, evaluator, overrides, args)


def watch(source, evaluator, overrides: dict, args: argparse.Namespace, sleep=time.sleep, clock=time.monotonic) -> int:
    """Poll the run (with backoff while nothing new comes) and evaluate each new complete
    checkpoint; stop once the run's last step (max_train_steps) is evaluated, or after
    --watch-timeout seconds without a new checkpoint (a run that died or was stopped). The run
    writes no other end marker: its last checkpoint, saved whenever training ends normally, is it."""
    from dmdr import inference
    from dmdr.evaluation import report
    from dmdr.evaluation.run import evaluate_run

    delay, last_new = args.poll_interval, clock()
    while True:
        if source.refresh():
            final = inference.load_run_config(source.run_dir, overrides).max_train_steps
            if evaluate_run(source, "all", evaluator, overrides, allow_none=True):
                delay, last_new = args.poll_interval, clock()
            rows = report.read_rows(source.run_dir / report.EVAL_DIR / report.METRICS_JSONL)
            if any(r["step"] >= final and r.get("key") == evaluator.key for r in rows):
                print(f"the run reached its last step ({final}) and it is evaluated: done", flush=True)
                return 0
        if clock() - last_new > args.watch_timeout:
            print(f"no new checkpoint for {args.watch_timeout:.0f} s (--watch-timeout) and the run's last step "
                  "is not evaluated: stopping; run again to continue", flush=True)
            return 0
        print(f"waiting {delay:.0f} s for a new checkpoint of {source.where}", flush=True)
        sleep(delay)
        delay = min(delay * 2, args.max_poll_interval)
