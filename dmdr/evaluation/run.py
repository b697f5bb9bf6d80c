"""Evaluate the checkpoints of a local run: sample a fixed prompt set with fixed seeds, score
the images with the reward models (CLIP, HPSv2.1) and compare their Inception statistics with a
reference (FID); one row per step in ``<run>/eval/metrics.jsonl`` (see `report`).

Image ``i`` of ``--num-images K`` is prompt ``i mod P`` of the P prompts, sampled with the base
seed ``--seed + i // P`` (the same per-prompt noise as `dmdr sample`, a new one each pass over
the prompts), so every step sees the same noise and the numbers compare across steps. A step is
skipped when metrics.jsonl already has its row for the same settings (the ``key``: metrics, VAE,
prompts, K, seed, reference), which makes a killed eval continue where it stopped.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from dmdr.errors import UserError
from dmdr.evaluation import report

METRICS = ("clip", "hps", "fid")
REF_STATS_NAME = "fid-ref-stats.npz"
# the run's own reward files and architectures (args.json fields), the defaults of the flags
_RUN_FIELDS = {"clip": ("clip_reward_model", "clip_reward_arch"), "hps": ("hpsv2_reward_model", "hps_reward_arch")}


def parse_metrics(text: str) -> tuple[str, ...]:
    """``"clip,hps,fid"`` -> ("clip", "hps", "fid"); an unknown name is a UserError."""
    names = tuple(dict.fromkeys(m.strip() for m in text.split(",") if m.strip()))
    unknown = [m for m in names if m not in METRICS]
    if not names or unknown:
        raise UserError(f"--metrics {text}: unknown metric {', '.join(unknown) or '(none given)'}; "
                        f"choose from {', '.join(METRICS)}")
    return names


def choose_steps(available: list[int], spec: str, where: str) -> list[int]:
    """``latest``, ``all`` or ``N,M,...`` among the `available` checkpoint steps."""
    if not available:
        raise UserError(f"{where} has no complete checkpoint yet (checkpoints/step-N.complete.json)")
    if spec == "latest":
        return available[-1:]
    if spec == "all":
        return list(available)
    wanted = [s.strip() for s in spec.split(",") if s.strip()]
    if not wanted or not all(s.isdigit() for s in wanted):
        raise UserError(f"--steps {spec}: use latest, all or step numbers separated by commas (e.g. 500,1000)")
    missing = [int(s) for s in wanted if int(s) not in available]
    if missing:
        raise UserError(f"--steps {spec}: no complete checkpoint for step(s) {missing} in {where}; have {available}")
    return sorted({int(s) for s in wanted})


@dataclass
class Settings:
    """What `dmdr eval` was asked for (everything but the run and the steps)."""

    prompts: list[str]
    num_images: int
    metrics: tuple[str, ...]
    seed: int = 2026
    batch_size: int = 8
    device: str = "cpu"
    reward_models: dict = field(default_factory=dict)  # name -> path given on the command line (or None)
    reward_archs: dict = field(default_factory=dict)  # name -> arch given on the command line (or None)
    magic_prompt: str | None = None
    inception: str = "inception-2015-12-05.pt"
    vae: str | None = None  # None: the run's
    ref_stats: str | None = None
    ref_images: str | None = None

    def __post_init__(self) -> None:
        if self.num_images < 1 or self.batch_size < 1:
            raise UserError("--num-images and --batch-size must be at least 1")
        if "fid" in self.metrics:
            if not (self.ref_stats or self.ref_images):
                raise UserError("--metrics fid needs a reference: --ref-images DIR or --ref-stats FILE.npz")
            if self.num_images < 2:
                raise UserError("--metrics fid needs --num-images 2 or more (a covariance of the features)")

    def images(self) -> list[tuple[str, int]]:
        """(prompt, base seed) of each image, in order."""
        n = len(self.prompts)
        return [(self.prompts[i % n], self.seed + i // n) for i in range(self.num_images)]

    def key(self) -> str:
        """A hash of what changes the numbers: a row with another key is evaluated again."""
        ref = None
        if "fid" in self.metrics:
            ref = _file_id(Path(self.ref_stats)) if self.ref_stats else _folder_id(Path(self.ref_images))
        parts = {"metrics": sorted(self.metrics), "images": self.images(), "ref": ref, "vae": self.vae,
                 "magic_prompt": self.magic_prompt if "hps" in self.metrics else None}
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def _file_id(path: Path) -> str:
    if not path.is_file():
        raise UserError(f"--ref-stats {path}: no such file")
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _folder_id(path: Path) -> str:
    if not path.is_dir():
        raise UserError(f"--ref-images {path}: not a folder of images")
    listing = sorted((p.name, p.stat().st_size) for p in path.iterdir() if p.is_file())
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()


class Evaluator:
    """The models that score (reward models, feature extractor, reference statistics), loaded
    once by `prepare` and reused for every step (and every poll of `--watch`)."""

    def __init__(self, settings: Settings, log: Callable[[str], object] = print):
        self.s, self.log, self.key = settings, log, settings.key()
        self.rewards = self.extractor = self.ref = None

    def prepare(self, cfg, eval_dir: Path) -> None:
        """Check and load what the metrics need; `cfg` (the run's) gives the default reward files."""
        if self.rewards is not None or self.extractor is not None:
            return
        import torch

        from dmdr.components import resolve_input_file
        from dmdr.evaluation import fid
        from dmdr.rewards import KINDS, RewardSet, RewardSpec

        specs = []
        for name in (m for m in self.s.metrics if m in KINDS):
            kind, (path_field, arch_field) = KINDS[name], _RUN_FIELDS[name]
            path = self.s.reward_models.get(name) or getattr(cfg, path_field, None) or kind.file_name
            arch = self.s.reward_archs.get(name) or getattr(cfg, arch_field, None)
            specs.append(RewardSpec(name, resolve_input_file(path, kind.flag), arch=arch,
                                    prefix=self.s.magic_prompt if name == "hps" else None))
        if specs:
            self.rewards = RewardSet(specs)
            self.rewards.check()
            self.rewards.load(self.s.device, torch.float32)
        if "fid" in self.s.metrics:
            self.extractor = fid.load_extractor(resolve_input_file(self.s.inception, "--inception"), self.s.device)
            if self.s.ref_stats:
                self.ref = fid.load_stats(self.s.ref_stats)
            else:
                mu, sigma, count = fid.image_dir_stats(Path(self.s.ref_images), self.extractor, self.s.batch_size)
                saved = fid.save_stats(eval_dir / REF_STATS_NAME, mu, sigma, count)
                self.log(f"FID reference: {count} images of {self.s.ref_images} (statistics saved to {saved}; "
                         "--ref-stats takes it next time)")
                self.ref = (mu, sigma)

    def evaluate_step(self, cfg, run_dir: Path, step: int) -> dict:
        """Sample the K images of checkpoint `step` in batches and compute the metrics' row."""
        import numpy as np
        import torch

        from dmdr import inference
        from dmdr.evaluation import fid

        started, device = time.monotonic(), torch.device(self.s.device)
        parts, unet = inference.load_generator(cfg, run_dir, step, device)
        scores: dict[str, list[float]] = {name: [] for name in (self.rewards.names if self.rewards else [])}
        feats = []
        images = self.s.images()
        done = 0
        for batch in _batches(images, self.s.batch_size):
            prompts = [p for p, _ in batch]
            pixels = inference.sample_images(cfg, parts, unet, prompts, batch[0][1], device)
            if self.rewards is not None:
                with torch.no_grad():
                    for name, values in self.rewards.scores(pixels, prompts).items():
                        scores[name] += values.float().cpu().tolist()
            if self.extractor is not None:
                feats.append(fid.features(self.extractor, pixels))
            done += len(batch)
            self.log(f"step {step}: {done}/{len(images)} images sampled and scored")
        del parts, unet
        row = {"step": step, "num_images": len(images), "key": self.key, "metrics": list(self.s.metrics)}
        row.update({name: float(np.mean(values)) for name, values in scores.items()})
        if "hps" in row:
            row["hps_x100"] = row["hps"] * 100
        if feats:
            row["fid"] = fid.frechet_distance(*fid.statistics(np.concatenate(feats)), *self.ref)
        row.update(seconds=round(time.monotonic() - started, 3), time=time.time())
        return row


def _batches(images: list[tuple[str, int]], size: int):
    """Consecutive images sharing a base seed, at most `size` at a time."""
    batch: list[tuple[str, int]] = []
    for item in images:
        if batch and (len(batch) == size or item[1] != batch[0][1]):
            yield batch
            batch = []
        batch.append(item)
    if batch:
        yield batch


def evaluate_run(source, steps: str, evaluator: Evaluator, overrides: dict | None = None,
                 allow_none: bool = False) -> list[int]:
    """Evaluate `steps` (latest|all|N,M) of a run (`source`: a `dmdr.evaluation.source` run)
    that metrics.jsonl lacks for these settings; after each, rewrite eval/metrics.* and publish
    them. Returns the steps evaluated now. `allow_none`: a run without checkpoints yet is no error."""
    from dmdr import inference

    run_dir = source.run_dir
    cfg = inference.load_run_config(run_dir, overrides)
    available = source.steps()
    if not available and allow_none:
        return []
    chosen = choose_steps(available, steps, source.where)
    eval_dir = run_dir / report.EVAL_DIR
    rows = report.read_rows(eval_dir / report.METRICS_JSONL)
    done = {r["step"] for r in rows if r.get("key") == evaluator.key}
    todo = [s for s in chosen if s not in done]
    log = evaluator.log
    if done & set(chosen) and not allow_none:
        log(f"already in {source.where}/{report.EVAL_DIR}/{report.METRICS_JSONL} with these settings: "
            f"steps {sorted(done & set(chosen))}")
    if not todo:
        return []
    evaluator.prepare(cfg, eval_dir)
    for step in todo:
        source.fetch(step)
        row = evaluator.evaluate_step(cfg, run_dir, step)
        rows = report.merge(rows, row)
        source.publish(report.write_all(eval_dir, rows, source.name))
        source.release(step)
        log("step {step}: {values} ({seconds:.1f} s)".format(step=step, seconds=row["seconds"], values="  ".join(
            f"{k}={row[k]:.4f}" for k in ("clip", "hps", "hps_x100", "fid") if k in row)))
    return todo
