"""Run logs: ``log.txt`` plus stdout lines, JSONL loss logs, progress lines.

Lines are plain (no carriage returns, no colour codes) so ``kubectl logs`` stays readable.
Only the main process writes files; other ranks log warnings and errors to stderr.
"""
from __future__ import annotations

import json
import logging
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

LOGGER_NAME = "dmdr"


def get_logger() -> logging.Logger:
    return logging.getLogger(LOGGER_NAME)


def quiet_libraries() -> None:
    """Library progress bars use carriage returns: keep them off unless stdout is a terminal,
    and keep the libraries' chatter to warnings that matter."""
    import os

    if not sys.stdout.isatty():
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        try:
            import diffusers.utils.logging as dl
            import transformers.utils.logging as tl

            dl.disable_progress_bar()
            tl.disable_progress_bar()
        except ImportError:
            pass
    try:
        import diffusers.utils.logging as dl
        import transformers.utils.logging as tl

        dl.set_verbosity_error()
        tl.set_verbosity_error()
    except ImportError:
        pass


def setup_logging(run_dir: Path | None, is_main: bool, rank: int = 0) -> logging.Logger:
    """stdout for everyone (rank-tagged), ``<run_dir>/log.txt`` on the main process."""
    quiet_libraries()
    logger = get_logger()
    logger.handlers.clear()
    logger.propagate = False
    logger.setLevel(logging.INFO if is_main else logging.WARNING)
    tag = "" if is_main else f"[rank {rank}] "
    fmt = logging.Formatter(f"[%(asctime)s] {tag}%(message)s", "%Y-%m-%d %H:%M:%S")
    from dmdr.redact import RedactFilter

    stream = logging.StreamHandler(sys.stdout)
    stream.setFormatter(fmt)
    stream.addFilter(RedactFilter())
    logger.addHandler(stream)
    if is_main and run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(run_dir / "log.txt", encoding="utf-8")
        fh.setFormatter(fmt)
        fh.addFilter(RedactFilter())
        logger.addHandler(fh)
    return logger


class JsonlLog:
    """An append-only JSONL file where every line is one JSON object with a ``step``.

    ``truncate_after(step)`` drops lines past a resumed checkpoint so a resumed run neither
    duplicates nor skips steps.
    """

    def __init__(self, path: Path, key: str = "step"):
        self.path = path
        self.key = key
        path.parent.mkdir(parents=True, exist_ok=True)

    def truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a half-written last line from a killed run
            if isinstance(row, dict) and row.get(self.key, 0) <= step:
                kept.append(line)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(k + "\n" for k in kept), encoding="utf-8")
        tmp.replace(self.path)

    def reset(self) -> None:
        self.path.write_text("", encoding="utf-8")

    def append(self, row: dict[str, Any]) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row, sort_keys=False) + "\n")


def format_duration(seconds: float) -> str:
    """``HH:MM:SS``, with whole days in front past 24 h (``1d 03:46:40``); ``?`` when unknown."""
    if seconds != seconds or seconds in (float("inf"), float("-inf")):
        return "?"
    days, rest = divmod(int(round(max(seconds, 0.0))), 86400)
    clock = f"{rest // 3600:02d}:{rest // 60 % 60:02d}:{rest % 60:02d}"
    return f"{days}d {clock}" if days else clock


def peak_gpu_memory_gib(device: Any) -> float | None:
    """Peak memory allocated by torch on a CUDA ``device`` since the start, in GiB; None elsewhere."""
    if getattr(device, "type", str(device).split(":")[0]) != "cuda":
        return None
    import torch

    return torch.cuda.max_memory_allocated(device) / 2**30


class Progress:
    """Throughput and ETA for progress lines, from the rate over the last ``window`` calls (a
    smoothed rate: one slow step, a checkpoint or a sample grid does not swing the ETA)."""

    def __init__(self, total: int, start: int, images_per_step: int, window: int = 20,
                 clock: Any = time.perf_counter):
        self.total, self.start = total, start
        self.images_per_step = images_per_step
        self.clock = clock
        self.marks: deque[tuple[float, int]] = deque([(clock(), start)], maxlen=window + 1)

    def rates(self, step: int) -> dict[str, float]:
        now = self.clock()
        t_old, step_old = self.marks[0]
        self.marks.append((now, step))
        steps_per_s = (step - step_old) / max(now - t_old, 1e-9)
        eta = (self.total - step) / steps_per_s if steps_per_s > 0 else float("inf")
        return {"steps_per_s": steps_per_s, "images_per_s": steps_per_s * self.images_per_step, "eta_s": eta}

    @staticmethod
    def line(step: int, total: int, rates: dict[str, float], losses: dict[str, float], lr: float | None = None,
             peak_mem_gib: float | None = None) -> str:
        parts = [f"step {step}/{total}", f"{rates['steps_per_s']:.3f} step/s", f"{rates['images_per_s']:.2f} img/s",
                 f"ETA {format_duration(rates['eta_s'])}"]
        parts += [f"{k} {v:.4g}" for k, v in losses.items()]
        if lr is not None:
            parts.append(f"lr {lr:.3g}")
        if peak_mem_gib is not None:
            parts.append(f"peak mem {peak_mem_gib:.1f} GiB")
        return " | ".join(parts)
