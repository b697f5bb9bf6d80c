"""`dmdr plot`: loss and reward curves of the loss logs as one PNG; training's plot never raises."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
from PIL import Image

from dmdr import cli, plot


def _write_logs(run: Path, steps: int = 12, rewards_from: int = 6) -> None:
    logs = run / "loss_logs"
    logs.mkdir(parents=True)
    gen = [{"step": s, "loss_dmd": 1 / s, "loss_gen": 1 / s + 0.1, "clip": 0.2 + s / 100 if s >= rewards_from else 0.0,
            "hps": 0.0, **({"sample_clip": 0.3} if s % 4 == 0 else {})} for s in range(1, steps + 1)]
    gui = [{"step": s // 2, "loss_gui": 2.0 - s / 20} for s in range(2 * steps)]
    (logs / "loss_gen_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in gen) + '{"step": 13, "loss_')
    (logs / "loss_gui_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in gui))


def test_plot_cli_draws_one_png_into_the_run(tmp_path, capsys):
    run = tmp_path / "exp"
    _write_logs(run)
    assert cli.main(["plot", "--run", str(run)]) == 0
    png = run / "plots" / "losses.png"
    assert f"wrote {png}" in capsys.readouterr().out
    img = np.asarray(Image.open(png).convert("L"))
    assert img.shape[0] > 400 and img.shape[1] > 400
    assert (img < 128).mean() > 0.005  # curves, axes and text, not a blank page
    assert not list(png.parent.glob("*.tmp*"))


def test_series_leave_out_rewards_before_the_reward_phase(tmp_path):
    run = tmp_path / "exp"
    _write_logs(run, rewards_from=6)
    rows = plot.read_rows(run / plot.GEN_LOG)
    assert [r["step"] for r in rows] == list(range(1, 13))  # the half-written last line is skipped
    assert plot._series(rows, "clip")[0] == list(range(6, 13))
    assert plot._series(rows, "hps") == ([], [])
    assert plot._series(rows, "sample_clip")[0] == [4, 8, 12]
    steps, means = plot._per_step_mean(plot.read_rows(run / plot.GUI_LOG), "loss_gui")
    assert steps == list(range(12)) and means[0] == (2.0 + 1.95) / 2


def test_plot_of_a_folder_without_logs_is_one_line(tmp_path, capsys):
    assert cli.main(["plot", "--run", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "loss_logs/loss_gen_log.jsonl" in err and "Traceback" not in err


def test_a_failing_plot_during_training_is_one_warning(tmp_path, caplog):
    run = tmp_path / "exp"
    _write_logs(run)
    (run / "plots").write_text("a file where the plots folder goes")
    written = []
    with caplog.at_level(logging.WARNING, logger="t"):
        plot.plot_in_run(run, written.append, logging.getLogger("t"))
    assert written == []
    assert len(caplog.records) == 1 and "no loss plot this time" in caplog.records[0].message
    plot.plot_in_run(tmp_path / "missing", written.append, logging.getLogger("t"))  # no logs yet: no raise either
    (run / "plots").unlink()
    plot.plot_in_run(run, written.append, logging.getLogger("t"))
    assert written == [run / "plots" / "losses.png"]
