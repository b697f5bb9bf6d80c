"""Read back what the trackers wrote: TensorBoard events (tensorboard's own reader), a W&B
offline run's transaction log, an MLflow store (MLflow's client)."""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

WANDB_BLOCK = 32768  # the .wandb file is a LevelDB-style log of Record protobufs in 32 KiB blocks


def tracker_env(tmp: Path) -> dict:
    """W&B offline and MLflow on a file store, both under `tmp`."""
    return {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp / "wandb"), "WANDB_SILENT": "true",
            "MLFLOW_TRACKING_URI": (tmp / "mlruns").as_uri(), "MLFLOW_ALLOW_FILE_STORE": "true"}


def tensorboard_events(logdir: Path):
    """One EventAccumulator per event file below `logdir` (scalars, images, text all kept)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accs = []
    for path in sorted(logdir.rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(path), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
        acc.Reload()
        accs.append(acc)
    return accs


def wandb_records(run_file: Path):
    """The Record protobufs of a W&B offline run file (``run-<id>.wandb``)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = run_file.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        if WANDB_BLOCK - pos % WANDB_BLOCK < 7:  # a block's tail too short for a header is padding
            pos += WANDB_BLOCK - pos % WANDB_BLOCK
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST chunk of a record
            record = pb.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def wandb_run(wandb_dir: Path) -> tuple[dict, list[dict]]:
    """(config, history rows) of the one offline run below `wandb_dir`, values decoded from JSON."""
    (run_file,) = wandb_dir.rglob("offline-run-*/run-*.wandb")
    config, history = {}, []
    for record in wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "config":
            config.update({i.key: json.loads(i.value_json) for i in record.config.update if i.key})
        elif kind == "history":
            history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
    return config, history


def mlflow_client(tmp: Path):
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=(tmp / "mlruns").as_uri())
