"""Experiment trackers (``--report-to``): TensorBoard, Weights & Biases and MLflow, through
accelerate's trackers, on the main process only.

What each tracker gets: the run's options once (as args.json has them: credentials stripped),
every scalar of the two loss logs (``gen/*`` against the generator step, ``gui/*`` against the
guidance log's inner step) and each sample grid with its prompts. TensorBoard writes into
``<run_dir>/tensorboard/``, which the syncer uploads with the logs; W&B writes its local files
into the run directory (or $WANDB_DIR); MLflow goes to $MLFLOW_TRACKING_URI, or a file store in
``<run_dir>/mlruns`` when that is unset.

`parse` is light (no heavy imports): the configuration validates ``--report-to`` with it.
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any

from dmdr.errors import UserError

TRACKERS = ("tensorboard", "wandb", "mlflow")
TENSORBOARD_DIR = "tensorboard"
# The run's W&B id and MLflow run id: the next attempt (a resume, a restarted pod: the syncer
# uploads it with the logs and a fresh pod gets it back) continues the same tracker runs.
IDS_FILE = "tracking.json"
# log keys that are axes or bookkeeping, not curves
_NOT_SCALARS = ("step", "inner_step", "time")


def installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def parse(report_to: str) -> list[str]:
    """The trackers ``--report-to`` names: none, all (every installed one), or a comma list."""
    value = (report_to or "none").strip().lower()
    if value in ("", "none"):
        return []
    if value == "all":
        names = [t for t in TRACKERS if installed(t)]
        if not names:
            raise UserError("--report-to all: no tracker is installed; install one, e.g. pip install 'dmdr[tensorboard]'"
                            " (or [wandb], [mlflow])")
        return names
    names = list(dict.fromkeys(n.strip() for n in value.split(",") if n.strip()))
    for name in names:
        if name not in TRACKERS:
            raise UserError(f"--report-to: {name!r} is not a tracker; use none, all, or one or more of "
                            f"{', '.join(TRACKERS)} (comma-separated)")
        if not installed(name):
            raise UserError(f"--report-to {name}: the {name} package is not installed; pip install 'dmdr[{name}]' "
                            f"(the image: build it with EXTRAS={name})")
    return names


def tracker_config(cfg) -> dict[str, Any]:
    """The options as args.json has them (credentials stripped), flattened to the scalar values
    every tracker accepts: lists and None as JSON text."""
    return {k: v if isinstance(v, (bool, int, float, str)) else json.dumps(v) for k, v in cfg.to_dict().items()}


class Tracking:
    """The run's trackers. Every method is a no-op on other ranks and without ``--report-to``."""

    def __init__(self, acc, cfg, synced_to: str | None = None):
        from dmdr.logs import get_logger

        self.acc = acc
        self.failed: set[str] = set()  # trackers that failed to log once (warned about)
        self.names = parse(cfg.report_to) if acc.is_main_process else []
        if not self.names:
            return
        log = get_logger()
        run_name = cfg.tracker_run_name or cfg.exp_name
        ids = _read_ids(cfg.run_dir)
        init: dict[str, dict[str, Any]] = {"mlflow": {"run_name": run_name}}
        if "wandb" in self.names:
            init["wandb"] = self._wandb_init(cfg, run_name)
            if ids.get("wandb"):
                init["wandb"].update(id=ids["wandb"], resume="allow")
        if "mlflow" in self.names:
            _mlflow_store(cfg.run_dir)
            if _mlflow_run_exists(ids.get("mlflow")):
                init["mlflow"]["run_id"] = ids["mlflow"]
        try:
            acc.init_trackers(cfg.tracker_project, config=tracker_config(cfg), init_kwargs=init)
        except Exception as exc:  # a tracker's server or key refused us: one line, no traceback
            from dmdr.redact import redact

            name = next((n for n in self.names if type(exc).__module__.startswith(n)), ",".join(self.names))
            first = (redact(str(exc)).strip().splitlines() or [type(exc).__name__])[0]
            raise UserError(f"--report-to {name}: the tracker did not start ({type(exc).__name__}: {first}); "
                            f"check its settings (see README, Experiment tracking) or drop it from --report-to") from None
        if "wandb" in self.names:
            run = acc.get_tracker("wandb", unwrap=True)
            for axis, pattern in (("step", "gen/*"), ("step", "samples*"), ("inner_step", "gui/*")):
                run.define_metric(axis, hidden=True)
                run.define_metric(pattern, step_metric=axis)
        _write_ids(cfg.run_dir, {t.name: t.tracker.id if t.name == "wandb" else t.tracker.info.run_id
                                 for t in acc.trackers if t.name in ("wandb", "mlflow")})
        for line in self._where(cfg, run_name, synced_to):
            log.info(line)

    @staticmethod
    def _wandb_init(cfg, run_name: str) -> dict[str, Any]:
        from dmdr.redact import redact

        init: dict[str, Any] = {"name": run_name, "dir": os.environ.get("WANDB_DIR") or str(cfg.run_dir)}
        Path(init["dir"]).mkdir(parents=True, exist_ok=True)
        if any(redact(a) != a for a in sys.argv):
            # W&B records the command line with the host's metadata: not when it carries credentials
            init["settings"] = {"x_disable_meta": True}
        return init

    def _where(self, cfg, run_name: str, synced_to: str | None) -> list[str]:
        from dmdr.redact import redact

        lines = []
        for tracker in self.acc.trackers:
            if tracker.name == "tensorboard":
                sync = f" (synced to {synced_to}/{TENSORBOARD_DIR}/)" if synced_to else ""
                lines.append(f"tensorboard: events in {tracker.logging_dir}{sync}; view with "
                             f"tensorboard --logdir {cfg.run_dir / TENSORBOARD_DIR}")
            elif tracker.name == "wandb":
                run = tracker.run
                where = f"offline, files in {run.dir}" if run.settings.mode == "offline" else run.url
                lines.append(f"wandb: project {cfg.tracker_project}, run {run_name} ({where})")
            elif tracker.name == "mlflow":
                lines.append(f"mlflow: experiment {cfg.tracker_project}, run {run_name} "
                             f"(id {tracker.active_run.info.run_id}) at {redact(os.environ['MLFLOW_TRACKING_URI'])}")
        return lines

    def log_row(self, prefix: str, row: dict[str, Any], axis: str) -> None:
        """The scalars of one loss-log row as ``<prefix>/<key>``, against ``row[axis]``."""
        if not self.names:
            return
        step = int(row[axis])
        values = {f"{prefix}/{k}": float(v) for k, v in row.items()
                  if k not in _NOT_SCALARS and isinstance(v, (int, float))}

        def log(tracker) -> None:
            if tracker.name == "wandb":  # one W&B step counter: the axis is a logged metric
                tracker.log({**values, axis: step})
            else:
                tracker.log(values, step=step)

        self._each(f"{prefix} scalars", log)

    def log_samples(self, images, prompts: list[str], files: list[Path], step: int) -> None:
        """A sample grid: ``images`` (N, 3, H, W) in [0, 1], their prompts, and the grid's files
        as saved (PNG and the prompts' JSON)."""
        if not self.names:
            return
        images = images.detach().float().clamp(0, 1).cpu()
        self._each("samples", lambda tracker: _log_samples(tracker, images, prompts, files, step))

    def _each(self, what: str, log) -> None:
        """`log(tracker)` for every tracker. A tracker that fails (its server away, its disk full)
        does not stop training: one warning per tracker, and the next rows are tried again."""
        for tracker in self.acc.trackers:
            try:
                log(tracker)
            except Exception as exc:  # noqa: BLE001 - any tracker error: the run's own logs have it all
                if tracker.name in self.failed:
                    continue
                self.failed.add(tracker.name)
                from dmdr.logs import get_logger
                from dmdr.redact import redact

                first = (redact(str(exc)).strip().splitlines() or [""])[0]
                get_logger().warning(f"WARNING: {tracker.name}: logging {what} failed ({type(exc).__name__}: {first}); "
                                     f"training goes on and loss_logs/ and samples/ keep every value; later "
                                     f"failures of {tracker.name} are not reported")

    def finish(self) -> None:
        """Close every tracker (a stop before the end of training: the trackers keep what was logged)."""
        for tracker in self.acc.trackers if self.names else []:
            tracker.finish()
        self.names = []


def _log_samples(tracker, images, prompts: list[str], files: list[Path], step: int) -> None:
    if tracker.name == "tensorboard":
        from torchvision.utils import make_grid

        from dmdr.inference import grid_shape

        writer = tracker.writer
        writer.add_image("samples", make_grid(images, nrow=grid_shape(len(images))[1]), step)
        writer.add_text("samples/prompts", "\n".join(f"{i}. {p}" for i, p in enumerate(prompts, 1)), step)
        writer.flush()
    elif tracker.name == "wandb":
        import wandb

        tiles = [wandb.Image(img.permute(1, 2, 0).numpy(), caption=p) for img, p in zip(images, prompts)]
        tracker.log({"samples": tiles, "step": step})
    elif tracker.name == "mlflow":
        import mlflow

        for path in files:
            mlflow.log_artifact(str(path), artifact_path="samples")


def _read_ids(run_dir: Path) -> dict[str, str]:
    try:
        ids = json.loads((run_dir / IDS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return ids if isinstance(ids, dict) else {}


def _write_ids(run_dir: Path, ids: dict[str, str]) -> None:
    if not ids:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / (IDS_FILE + ".tmp")
    tmp.write_text(json.dumps(ids, indent=2) + "\n", encoding="utf-8")
    tmp.replace(run_dir / IDS_FILE)


def _mlflow_run_exists(run_id: str | None) -> bool:
    """Whether the store has this run (a file store that was not kept, another server: a new run)."""
    if not run_id:
        return False
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        MlflowClient().get_run(run_id)
    except MlflowException:
        return False
    return True


def _mlflow_store(run_dir: Path) -> None:
    """Without $MLFLOW_TRACKING_URI, a file store in the run directory (not the working
    directory of a pod, which is gone with it); file stores need MLflow's opt-in."""
    uri = os.environ.setdefault("MLFLOW_TRACKING_URI", (run_dir / "mlruns").resolve().as_uri())
    if uri.startswith("file:") or "://" not in uri:
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
