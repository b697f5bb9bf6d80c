"""--report-to all: TensorBoard, W&B (offline) and MLflow (file store) each get the run's options,
every scalar of both loss logs and the sample grids with their prompts, read back with each
tracker's own reader and compared with the JSONL loss logs."""
import json

import pytest

from helpers_tracking import mlflow_client, tensorboard_events, tracker_env, wandb_records, wandb_run
from helpers_train import read_jsonl, run_dmdr, tiny_args

pytestmark = pytest.mark.slow
BOOKKEEPING = ("step", "inner_step", "time")


def _curves(rows: list[dict], prefix: str, axis: str) -> dict[str, dict[int, float]]:
    """{"gen/loss_dmd": {step: value}} from JSONL rows: what every tracker must show."""
    curves: dict[str, dict[int, float]] = {}
    for row in rows:
        for key, value in row.items():
            if key not in BOOKKEEPING:
                curves.setdefault(f"{prefix}/{key}", {})[row[axis]] = value
    return curves


def test_report_to_all_logs_options_scalars_and_samples_to_every_tracker(tmp_path):
    cache, out = tmp_path / "cache", tmp_path / "out"
    proc = run_dmdr(tiny_args(out, "t", cache, "--max-train-steps", "2", "--sample-steps", "2", "--checkpoint-steps",
                              "2", "--report-to", "all", "--tracker-project", "proj", "--tracker-run-name", "first"),
                    cache, **tracker_env(tmp_path))
    run = out / "t"
    expected = {**_curves(read_jsonl(run / "loss_logs" / "loss_gen_log.jsonl"), "gen", "step"),
                **_curves(read_jsonl(run / "loss_logs" / "loss_gui_log.jsonl"), "gui", "inner_step")}
    assert {"gen/loss_dmd", "gen/lr_gen", "gen/images_per_s", "gui/loss_gui", "gui/lr_gui"} <= set(expected)
    assert len(expected["gui/loss_gui"]) == 5 and list(expected["gen/loss_dmd"]) == [1, 2]
    grid = json.loads((run / "samples" / "step-000002_seed-30.json").read_text())
    prompts = [tile["prompt"] for tile in grid["tiles"]]
    for line in ("tensorboard: events in", "wandb: project proj, run first (offline", "mlflow: experiment proj, run first"):
        assert line in proc.stdout, proc.stdout

    # TensorBoard, in the run directory
    accs = tensorboard_events(run / "tensorboard")
    scalars = {tag: {e.step: e.value for e in acc.Scalars(tag)} for acc in accs for tag in acc.Tags()["scalars"]}
    for tag, points in expected.items():
        assert scalars[tag] == pytest.approx(points, rel=1e-6, abs=1e-12), tag
    (events,) = [acc for acc in accs if "samples" in acc.Tags()["images"]]
    image = events.Images("samples")[0]
    assert image.step == 2 and image.encoded_image_string.startswith(b"\x89PNG")
    text = events.Tensors("samples/prompts/text_summary")[0]
    assert text.step == 2 and all(p.encode() in text.tensor_proto.string_val[0] for p in prompts)
    (hparams,) = (run / "tensorboard").rglob("hparams.yml")
    assert "exp_name: t\n" in hparams.read_text()

    # Weights & Biases, offline
    config, history = wandb_run(tmp_path / "wandb")
    assert config["exp_name"] == "t" and config["tracker_project"] == "proj" and config["sample_prompts"] == "null"
    runs = [r.run for r in wandb_records(next((tmp_path / "wandb").rglob("run-*.wandb")))
            if r.WhichOneof("record_type") == "run"]
    assert runs[0].project == "proj" and runs[0].display_name == "first"
    for tag, points in expected.items():
        axis = "inner_step" if tag.startswith("gui/") else "step"
        assert {row[axis]: row[tag] for row in history if tag in row} == pytest.approx(points), tag
    (samples,) = [row for row in history if "samples/captions" in row]
    assert samples["step"] == 2 and samples["samples/captions"] == prompts and samples["samples/count"] == len(prompts)

    # MLflow, file store
    client = mlflow_client(tmp_path)
    (mlrun,) = client.search_runs([client.get_experiment_by_name("proj").experiment_id])
    assert mlrun.info.run_name == "first" and mlrun.data.params["exp_name"] == "t"
    for tag, points in expected.items():
        assert {m.step: m.value for m in client.get_metric_history(mlrun.info.run_id, tag)} == pytest.approx(points), tag
    artifacts = {a.path for a in client.list_artifacts(mlrun.info.run_id, "samples")}
    assert artifacts == {"samples/step-000002_seed-30.png", "samples/step-000002_seed-30.json"}
