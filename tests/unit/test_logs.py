"""Progress lines (ETA past a day, a smoothed rate, loss_gui / lr / peak memory) and the sample
grid layout and names."""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from dmdr import data, inference
from dmdr.logs import Progress, format_duration, peak_gpu_memory_gib


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("seconds, text", [(0, "00:00:00"), (59.6, "00:01:00"), (3725, "01:02:05"),
                                           (86399, "23:59:59"), (86400, "1d 00:00:00"),
                                           (99999 + 86400, "2d 03:46:39"), (float("inf"), "?")])
def test_durations_past_a_day_print_days(seconds, text):
    assert format_duration(seconds) == text


def test_eta_of_a_long_run_does_not_wrap_at_24_hours():
    clock = Clock()
    p = Progress(total=100_001, start=0, images_per_step=8, clock=clock)
    clock.now = 1.0
    line = Progress.line(1, 100_001, p.rates(1), {})
    assert "ETA 1d 03:46:40" in line  # 100000 steps at 1 step/s; time.gmtime printed 03:46:40


def test_rate_is_an_average_over_the_last_steps_not_the_last_step():
    clock = Clock()
    p = Progress(total=1000, start=0, images_per_step=4, window=10, clock=clock)
    for step in range(1, 10):  # 1 s per step
        clock.now += 1.0
        p.rates(step)
    clock.now += 10.0  # one slow step (a checkpoint)
    r = p.rates(10)
    assert r["steps_per_s"] == pytest.approx(10 / 19)  # not 0.1, the last step alone
    assert r["images_per_s"] == pytest.approx(40 / 19)
    for step in range(11, 31):  # the window moves on: back to 1 step/s
        clock.now += 1.0
        r = p.rates(step)
    assert r["steps_per_s"] == pytest.approx(1.0)
    assert r["eta_s"] == pytest.approx(970.0)


def test_line_carries_losses_lr_and_peak_memory():
    rates = {"steps_per_s": 0.5, "images_per_s": 4.0, "eta_s": 90.0}
    line = Progress.line(6, 10, rates, {"loss_dmd": 0.25, "loss_gui": 1.5}, lr=1e-7, peak_mem_gib=37.26)
    assert line == ("step 6/10 | 0.500 step/s | 4.00 img/s | ETA 00:01:30 | loss_dmd 0.25 | loss_gui 1.5 | "
                    "lr 1e-07 | peak mem 37.3 GiB")
    assert peak_gpu_memory_gib(torch.device("cpu")) is None  # CUDA only


@pytest.mark.parametrize("n, shape", [(1, (1, 1)), (2, (1, 2)), (3, (1, 3)), (4, (2, 2)), (5, (2, 3)),
                                      (6, (2, 3)), (7, (2, 4)), (8, (2, 4)), (9, (3, 3)), (16, (4, 4))])
def test_grids_are_readable_rectangles(n, shape):
    rows, cols = inference.grid_shape(n)
    assert (rows, cols) == shape
    assert cols >= rows and rows * cols - n < cols  # landscape, at most one row not full


def test_sample_grid_names_step_and_seed_and_lists_prompts_beside_it(tmp_path):
    images = torch.rand(5, 3, 8, 8)
    prompts = [f"prompt {i}" for i in range(5)]
    png, meta = inference.save_sample_grid(images, prompts, tmp_path / "samples", step=600, seed=30)
    assert png == tmp_path / "samples" / "step-000600_seed-30.png"
    assert meta == png.with_suffix(".json")
    with Image.open(png) as img:  # 2 rows x 3 columns of 8 px tiles with make_grid's 2 px padding
        assert img.size == (3 * 10 + 2, 2 * 10 + 2)
    grid = json.loads(meta.read_text())
    assert (grid["step"], grid["seed"], grid["rows"], grid["cols"], grid["image"]) == (600, 30, 2, 3, png.name)
    assert grid["tiles"][4] == {"row": 1, "col": 1, "prompt": "prompt 4", "seed": data.prompt_seed("prompt 4", 30)}
    assert [p.name for p in (tmp_path / "samples").iterdir()] and not list((tmp_path / "samples").glob("*.tmp"))
