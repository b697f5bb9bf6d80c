"""--report-to: which trackers a value names, one-line errors for unknown or missing ones, and the
options the trackers get (credentials stripped, every value a scalar)."""
import importlib.util

import pytest

from dmdr import cli, config, tracking
from dmdr.errors import UserError


def _cfg(**values) -> config.TrainConfig:
    return config.build_config({"preset": "tiny", **values})


@pytest.mark.parametrize("value, names", [
    ("none", []), ("tensorboard", ["tensorboard"]), ("wandb", ["wandb"]), ("mlflow", ["mlflow"]),
    ("all", ["tensorboard", "wandb", "mlflow"]), (" WandB, tensorboard,wandb ", ["wandb", "tensorboard"]),
])
def test_report_to_names_trackers(value, names):
    assert tracking.parse(value) == names
    assert _cfg(report_to=value).report_to == value


def test_an_unknown_tracker_is_one_line_naming_the_choices(capsys):
    assert cli.main(["train", "--preset", "tiny", "--report-to", "tensorboard,comet"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == ("dmdr train: error: --report-to: 'comet' is not a tracker; use none, all, or one or more "
                           "of tensorboard, wandb, mlflow (comma-separated)")


def test_a_tracker_that_is_not_installed_names_the_extra(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    with pytest.raises(UserError, match=r"^--report-to wandb: the wandb package is not installed; "
                                        r"pip install 'dmdr\[wandb\]' \(the image: build it with EXTRAS=wandb\)$"):
        _cfg(report_to="wandb")
    assert tracking.parse("all") == ["tensorboard", "mlflow"]  # all: the installed ones
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(UserError, match="no tracker is installed"):
        tracking.parse("all")


def test_trackers_get_the_options_without_credentials():
    cfg = _cfg(s3_endpoint_url="http://user:pw-123@minio:9000", sample_prompts=None, report_to="all")
    values = tracking.tracker_config(cfg)
    assert values["s3_endpoint_url"] == "http://minio:9000" and values["sample_prompts"] == "null"
    assert values["report_to"] == "all" and values["tracker_project"] == "dmdr"
    assert all(isinstance(v, (bool, int, float, str)) for v in values.values())
