"""Where `dmdr eval` reads a run and writes eval/: a local run directory, or an s3:// run
pulled piece by piece (args.json, eval/metrics.jsonl, then each checkpoint's generator only)
into a local cache, its eval/ files written back to the run's prefix after every step."""
from __future__ import annotations

import shutil
from pathlib import Path

from dmdr.evaluation import report


class LocalRun:
    """A run directory on this machine (or a shared volume)."""

    def __init__(self, run_dir: Path):
        self.run_dir, self.where, self.name = Path(run_dir), str(run_dir), Path(run_dir).name

    def steps(self) -> list[int]:
        from dmdr import inference

        return inference.available_steps(self.run_dir)

    def refresh(self) -> bool:
        """Whether the run has started (its args.json is there); the trainer writes here."""
        return (self.run_dir / "args.json").is_file()

    def fetch(self, step: int) -> None:
        """The checkpoint is here already."""

    def publish(self, paths: list[Path]) -> None:
        """eval/ is in the run already."""

    def release(self, step: int) -> None:
        """A local checkpoint is the run's own: kept."""


class S3Run:
    """s3://bucket/prefix/exp, cached under `cache` (``<cache>/<bucket>/<prefix>/<exp>``)."""

    RUN_FILES = ("args.json", f"{report.EVAL_DIR}/{report.METRICS_JSONL}")

    def __init__(self, uri: str, cfg, cache: Path):
        from dmdr.storage.uri import S3Uri

        self.exp, self.cfg = S3Uri.parse(uri), cfg
        self.where, self.name = str(self.exp), self.exp.name
        self.run_dir = Path(cache).expanduser() / self.exp.bucket / self.exp.key

    def refresh(self) -> bool:
        """Fetch args.json (a resumed run may raise its max_train_steps) and the store's
        metrics.jsonl (what an earlier eval wrote there); whether the run has started (args.json)."""
        from dmdr.storage.remote import download_run_files

        return "args.json" in download_run_files(self.where, self.run_dir, self.RUN_FILES, self.cfg)

    def steps(self) -> list[int]:
        from dmdr.storage.remote import list_checkpoints

        return [c.step for c in list_checkpoints(self.where, self.cfg) if c.complete]

    def fetch(self, step: int) -> None:
        """The generator's weights of `step` only (verified, as `dmdr pull --only generator`)."""
        from dmdr.storage.remote import download_checkpoint

        download_checkpoint(self.where, step, self.run_dir, only="generator", cfg=self.cfg)

    def publish(self, paths: list[Path]) -> None:
        """eval/metrics.{jsonl,csv,png} to the run's prefix (each a single PUT)."""
        from dmdr.storage.client import make_client, storage_errors

        client = make_client(self.cfg)
        with storage_errors(self.cfg, self.exp):
            for path in paths:
                obj = self.exp.join(f"{report.EVAL_DIR}/{path.name}")
                client.put_object(Bucket=obj.bucket, Key=obj.key, Body=path.read_bytes())

    def release(self, step: int) -> None:
        """Drop the pulled weights of an evaluated step: `--steps all` on SDXL needs one on disk at a time."""
        from dmdr.storage.layout import CHECKPOINTS, pulled_marker_rel

        (self.run_dir / pulled_marker_rel(step, "generator")).unlink(missing_ok=True)
        for group in ("accelerator_1", "lora_gen"):
            shutil.rmtree(self.run_dir / CHECKPOINTS / group / f"step-{step}", ignore_errors=True)
