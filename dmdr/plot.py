"""`dmdr plot`: a run's loss and reward curves, from its loss logs, in one PNG.

    dmdr plot --run runs/exp                 # -> runs/exp/plots/losses.png
    dmdr plot --run s3://bucket/prefix/exp   # fetches only the loss logs -> ./exp-losses.png

Training draws the same figure into ``<run>/plots/losses.png`` at every sample step (synced to
the store like the sample grids); a failure there is one warning line, never a stopped run.
matplotlib is imported when a figure is drawn (Agg, no display), not for `dmdr --help`.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Callable

from dmdr.errors import UserError

GEN_LOG, GUI_LOG = "loss_logs/loss_gen_log.jsonl", "loss_logs/loss_gui_log.jsonl"
PLOT_REL = "plots/losses.png"
GEN_LOSSES = ("loss_dmd", "loss_gen")
REWARDS = ("clip", "hps", "sample_clip", "sample_hps")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``plot`` subcommand; sets ``func=run``."""
    from dmdr.storage.cli import add_s3_options

    p = subparsers.add_parser("plot", help="loss and reward curves of a run as one PNG",
                              description="Draw the loss and reward curves of a run's loss logs into one PNG.")
    p.add_argument("--run", required=True,
                   help="run directory, or s3://bucket/prefix/exp (only its loss logs are downloaded)")
    p.add_argument("--out", type=Path, default=None,
                   help=f"PNG to write (default: <run>/{PLOT_REL}; for an s3:// run ./<exp>-losses.png)")
    add_s3_options(p)
    p.set_defaults(func=run)
    return p


def read_rows(path: Path) -> list[dict]:
    """The JSON rows of a loss log; a half-written last line (a killed run) is skipped."""
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and "step" in row:
            rows.append(row)
    return rows


def _series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of `key`; a reward's zeros before its first non-zero value (the logs hold
    0 until the reward phase starts) are left out, as are rows without the key."""
    points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
    if key in REWARDS:
        first = next((i for i, (_, v) in enumerate(points) if v != 0), len(points))
        points = points[first:]
    return [s for s, _ in points], [v for _, v in points]


def _per_step_mean(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    """Guidance rows: several per generator step (--ratio-update), averaged per step."""
    sums: dict[int, list[float]] = {}
    for r in rows:
        if isinstance(r.get(key), (int, float)):
            sums.setdefault(r["step"], []).append(r[key])
    steps = sorted(sums)
    return steps, [sum(sums[s]) / len(sums[s]) for s in steps]


def draw(gen_rows: list[dict], gui_rows: list[dict], out: Path, title: str) -> Path:
    """Three panels over generator steps: generator losses, guidance loss, reward scores."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 9), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(3, 1, sharex=True)
    panels = [(axes[0], "generator losses", [(k, _series(gen_rows, k)) for k in GEN_LOSSES]),
              (axes[1], "guidance (fake score) loss", [("loss_gui", _per_step_mean(gui_rows, "loss_gui"))]),
              (axes[2], "reward scores", [(k, _series(gen_rows, k)) for k in REWARDS])]
    for ax, name, curves in panels:
        ax.set_title(name, fontsize=10)
        drawn = False
        for label, (x, y) in curves:
            if x:
                sample = label.startswith("sample_")
                ax.plot(x, y, label=label, marker="o" if sample or len(x) < 20 else None,
                        linestyle="--" if sample else "-", markersize=3)
                drawn = True
        if drawn:
            ax.legend(fontsize=8)
            ax.grid(alpha=0.3)
        else:
            ax.text(0.5, 0.5, "none in the logs (yet)", ha="center", va="center", transform=ax.transAxes)
    axes[-1].set_xlabel("generator step")
    last = gen_rows[-1]["step"] if gen_rows else 0
    fig.suptitle(f"{title} (step {last})", fontsize=11)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    tmp.replace(out)  # readers (and the syncer) never see a half-written PNG
    return out


def plot_run(run_dir: Path, out: Path | None = None, title: str | None = None) -> Path:
    """Draw the curves of a local run directory into `out` (default ``<run>/plots/losses.png``)."""
    gen = run_dir / GEN_LOG
    if not gen.is_file():
        raise UserError(f"{run_dir} has no {GEN_LOG}: pass a run directory written by `dmdr train` "
                        "(or pulled with `dmdr pull`), or its s3:// URI")
    gui = run_dir / GUI_LOG
    return draw(read_rows(gen), read_rows(gui) if gui.is_file() else [], out or run_dir / PLOT_REL,
                title or run_dir.name)


def plot_in_run(run_dir: Path, written: Callable[[Path], object], log) -> None:
    """Training's plot at a sample step: draw, hand the PNG to `written` (the syncer); any
    failure is one warning line on `log`, never an exception."""
    try:
        written(plot_run(run_dir))
    except Exception as exc:  # noqa: BLE001 - a plot must never stop training
        log.warning(f"WARNING: no loss plot this time ({type(exc).__name__}: {exc}); training goes on")


def run(args: argparse.Namespace) -> int:
    """`dmdr plot`: a local run, or an s3:// run whose loss logs are fetched to a temporary folder."""
    from dmdr.storage.uri import S3Uri, is_s3_uri

    if not is_s3_uri(args.run):
        out = plot_run(Path(args.run), args.out)
    else:
        from dmdr.storage.cli import config_from_args
        from dmdr.storage.remote import download_run_files

        exp = S3Uri.parse(args.run)
        with tempfile.TemporaryDirectory(prefix="dmdr-plot-") as tmp:
            got = download_run_files(str(exp), tmp, (GEN_LOG, GUI_LOG), config_from_args(args, str(exp)))
            if GEN_LOG not in got:
                raise UserError(f"{exp} has no {GEN_LOG}: check the URI with `dmdr ls` (a run that has "
                                "not logged a step yet has none)")
            out = plot_run(Path(tmp), args.out or Path(f"{exp.name}-losses.png"), title=exp.name)
    print(f"wrote {out}")
    return 0
