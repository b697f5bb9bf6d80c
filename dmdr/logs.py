"""Run logs: ``log.txt`` plus stdout lines, JSONL loss logs, progress lines.

Lines are plain (no carriage returns, no colour codes) so ``kubectl logs`` stays readable.
Only the main process writes files; other ranks log warnings and errors to stderr.
"""
from __future__ import annotations

import json
import logging
import sys
import time
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
    stream = logging.StreamHandler(sys.stdout)
    stream.setFormatter(fmt)
    logger.addHandler(stream)
    if is_main and run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(run_dir / "log.txt", encoding="utf-8")
        fh.setFormatter(fmt)
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


class Progress:
    """Throughput and ETA for progress lines."""

    def __init__(self, total: int, start: int, images_per_step: int):
        self.total, self.start = total, start
        self.images_per_step = images_per_step
        self.t0 = time.perf_counter()
        self.last_t, self.last_step = self.t0, start

    def rates(self, step: int) -> dict[str, float]:
        now = time.perf_counter()
        dt = max(now - self.last_t, 1e-9)
        steps_per_s = (step - self.last_step) / dt
        overall = (step - self.start) / max(now - self.t0, 1e-9)
        self.last_t, self.last_step = now, step
        eta = (self.total - step) / overall if overall > 0 else float("inf")
        return {"steps_per_s": steps_per_s, "images_per_s": steps_per_s * self.images_per_step, "eta_s": eta}

    @staticmethod
    def line(step: int, total: int, rates: dict[str, float], losses: dict[str, float]) -> str:
        eta = rates["eta_s"]
        eta_txt = time.strftime("%H:%M:%S", time.gmtime(eta)) if eta != float("inf") else "?"
        parts = [f"step {step}/{total}", f"{rates['steps_per_s']:.3f} step/s", f"{rates['images_per_s']:.2f} img/s", f"ETA {eta_txt}"]
        parts += [f"{k} {v:.4g}" for k, v in losses.items()]
        return " | ".join(parts)
