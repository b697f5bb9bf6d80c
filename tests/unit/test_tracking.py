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


@pytest.fixture
def main_process(monkeypatch, tmp_path):
    """A one-process Accelerator logging to MLflow (file store in tmp_path); state reset after."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    def make(log_with="mlflow"):
        AcceleratorState._reset_state(reset_partial_state=True)
        return Accelerator(cpu=True, log_with=log_with)

    yield make
    AcceleratorState._reset_state(reset_partial_state=True)
    import mlflow

    try:  # MLflow's active run is process-global: the next test starts its own
        mlflow.end_run()
    except Exception:  # noqa: BLE001 - a store this test removed
        pass


def test_a_tracker_failing_mid_run_warns_once_and_training_goes_on(main_process, tmp_path, caplog):
    import shutil

    tracker = tracking.Tracking(main_process(), _cfg(report_to="mlflow", output_dir=str(tmp_path / "out")))
    tracker.log_row("gen", {"step": 1, "loss_dmd": 0.5, "time": 0.0}, "step")
    shutil.rmtree(tmp_path / "mlruns")  # the store is gone
    with caplog.at_level("WARNING", logger="dmdr"):
        tracker.log_row("gen", {"step": 2, "loss_dmd": 0.4}, "step")
        tracker.log_row("gen", {"step": 3, "loss_dmd": 0.3}, "step")
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and warnings[0].startswith("WARNING: mlflow: logging gen scalars failed (")
    assert "training goes on" in warnings[0]


def test_a_tracker_that_cannot_start_is_one_line(main_process, monkeypatch, tmp_path):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://user:pw-123@127.0.0.1:{port}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    with pytest.raises(UserError) as err:
        tracking.Tracking(main_process(), _cfg(report_to="mlflow", output_dir=str(tmp_path / "out")))
    message = str(err.value)
    assert message.startswith("--report-to mlflow: the tracker did not start (") and "\n" not in message
    assert "pw-123" not in message


def test_the_next_attempt_continues_the_same_wandb_and_mlflow_runs(main_process, monkeypatch, tmp_path):
    from helpers_tracking import mlflow_client, tracker_env, wandb_records

    for key, value in tracker_env(tmp_path).items():
        monkeypatch.setenv(key, value)
    cfg = _cfg(report_to="wandb,mlflow", output_dir=str(tmp_path / "out"), resume_ckpt="auto")
    for step in (1, 2):  # two attempts of one run (the second one resumes)
        tracker = tracking.Tracking(main_process(["wandb", "mlflow"]), cfg)
        tracker.log_row("gen", {"step": step, "loss_dmd": 1.0 / step}, "step")
        tracker.finish()
    ids = {json_record.run.run_id for path in (tmp_path / "wandb").rglob("run-*.wandb")
           for json_record in wandb_records(path) if json_record.WhichOneof("record_type") == "run"}
    assert len(list((tmp_path / "wandb").rglob("run-*.wandb"))) == 2 and len(ids) == 1
    client = mlflow_client(tmp_path)
    (run,) = client.search_runs([client.get_experiment_by_name("dmdr").experiment_id])
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "gen/loss_dmd")] == [(1, 1.0), (2, 0.5)]
    assert (cfg.run_dir / tracking.IDS_FILE).exists()
