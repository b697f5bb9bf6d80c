"""`<run>/eval/`: metrics.jsonl (one line per evaluated step), metrics.csv and metrics.png.

The JSONL file is rewritten whole (temporary file, then rename) after each evaluated step, so a
killed eval leaves either the old or the new file, never a half line; the CSV and the PNG are
derived from it and redrawn at the same time.
"""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path

EVAL_DIR = "eval"
METRICS_JSONL, METRICS_CSV, METRICS_PNG = "metrics.jsonl", "metrics.csv", "metrics.png"
# what each metric's panel is called, and the columns of the CSV after `step`
LABELS = {"clip": "CLIP score (cosine)", "hps": "HPSv2.1 (x100)", "fid": "FID (lower is better)"}
PLOTTED = {"clip": "clip", "hps": "hps_x100", "fid": "fid"}
CSV_COLUMNS = ("step", "clip", "hps", "hps_x100", "fid", "num_images", "seconds", "key")


def read_rows(path: Path) -> list[dict]:
    """The rows of metrics.jsonl (none when it is missing); lines that do not parse are skipped."""
    from dmdr.plot import read_rows as read_jsonl

    return [r for r in read_jsonl(path) if isinstance(r["step"], int)] if path.is_file() else []


def merge(rows: list[dict], row: dict) -> list[dict]:
    """`rows` with `row` in place of any earlier row of its step, sorted by step."""
    return sorted([r for r in rows if r["step"] != row["step"]] + [row], key=lambda r: r["step"])


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_all(eval_dir: Path, rows: list[dict], title: str) -> list[Path]:
    """Write metrics.jsonl, metrics.csv and metrics.png for `rows`; returns the three paths."""
    eval_dir.mkdir(parents=True, exist_ok=True)
    jsonl, table, png = eval_dir / METRICS_JSONL, eval_dir / METRICS_CSV, eval_dir / METRICS_PNG
    _atomic_write(jsonl, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    tmp = table.with_name(table.name + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, table)
    draw(rows, png, title)
    return [jsonl, table, png]


def draw(rows: list[dict], out: Path, title: str) -> Path:
    """One panel per metric present in `rows`, against the checkpoint step."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    metrics = [m for m in PLOTTED if any(PLOTTED[m] in r for r in rows)] or ["clip"]
    fig = Figure(figsize=(7, 2.6 * len(metrics) + 0.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(metrics), 1, sharex=True, squeeze=False)[:, 0]
    for ax, metric in zip(axes, metrics):
        points = [(r["step"], r[PLOTTED[metric]]) for r in rows if isinstance(r.get(PLOTTED[metric]), (int, float))]
        ax.set_title(LABELS[metric], fontsize=10)
        if points:
            ax.plot([s for s, _ in points], [v for _, v in points], marker="o", markersize=4)
            ax.grid(alpha=0.3)
        else:
            ax.text(0.5, 0.5, "not evaluated (yet)", ha="center", va="center", transform=ax.transAxes)
    axes[-1].set_xlabel("generator step")
    fig.suptitle(title, fontsize=11)
    tmp = out.with_name(out.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    tmp.replace(out)
    return out
