"""The README's "Using a trained generator" commands, as written there, against moto: a tiny run
trained with --s3-uri, then pull -> sample -> export -> score -> plot in an empty folder."""
from __future__ import annotations

import json
import shlex

import pytest
from PIL import Image

from dmdr import cli
from dmdr.models.tiny_clip import write_tiny_reward_checkpoints
from helpers_s3 import aws_env, shared_moto
from helpers_train import env, readme_commands, train_tiny_into_store

pytestmark = pytest.mark.slow
EXP = "s3://bucket/prefix/exp"  # what the README writes; the tests' bucket replaces it


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny run of 2 steps (checkpoint and samples at 2) uploaded to s3://<bucket>/prefix/exp."""
    moto = shared_moto()
    bucket, cache = train_tiny_into_store(moto, tmp_path_factory.mktemp("flow"), "--checkpoint-steps", "2",
                                          "--sample-steps", "2")
    return moto, f"s3://{bucket}/prefix/exp", cache


@pytest.fixture
def dmdr(trained, tmp_path, monkeypatch, capsys):
    """Run a README command line in `tmp_path`, in this process (the trainer's imports are paid
    once); the store's endpoint comes from AWS_ENDPOINT_URL, as for a user of MinIO."""
    moto, _, cache = trained
    for key, value in env(cache, **aws_env({"AWS_ENDPOINT_URL": moto.endpoint})).items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)

    def run(argv: list[str]) -> tuple[str, str]:
        assert argv[0] == "dmdr"
        status = cli.main(argv[1:])
        out, err = capsys.readouterr()
        assert status == 0, f"{shlex.join(argv)}:\n{out[-2000:]}\n{err[-3000:]}"
        return out, err

    return run


def test_readme_pull_sample_export_score_plot_chain(trained, dmdr, tmp_path):
    _, uri, _ = trained
    commands = readme_commands("### Using a trained generator")
    assert [c[1] for c in commands] == ["pull", "sample", "export", "score", "plot"]
    tiny = write_tiny_reward_checkpoints(tmp_path / "models", seed=3)
    (tmp_path / "HPS_v2.1_compressed.pt").symlink_to(tiny["hps"])
    (tmp_path / "prompts.txt").write_text("a red fox, photograph\n", encoding="utf-8")
    for argv in commands:
        argv = [uri if a == EXP else a for a in argv]
        if argv[1] == "score":  # the tiny HPS checkpoint has a tiny architecture
            argv += ["--hps-reward-arch", str(tiny["config"]), "--device", "cpu"]
        dmdr(argv)

    run = tmp_path / "runs" / "exp"
    files = sorted(p.relative_to(run).as_posix() for p in run.rglob("*") if p.is_file())
    # --only generator: the weights, their marker and the run's files; no optimiser, no lock left behind
    assert files == ["args.json", "checkpoints/accelerator_1/step-2/model.safetensors", "checkpoints/step-2.generator.json",
                     "loss_logs/loss_gen_log.jsonl", "loss_logs/loss_gui_log.jsonl", "plots/losses.png"]
    assert Image.open(tmp_path / "samples" / "0000.png").size == (64, 64)
    assert (tmp_path / "sdxl-dmdr-unet" / "diffusion_pytorch_model.safetensors").is_file()
    report = json.loads((tmp_path / "samples" / "scores.json").read_text())  # beside the images, not in cwd
    assert report["count"] == 1 and "hps" in report["mean"]
    assert not (tmp_path / "scores.json").exists()
    assert Image.open(run / "plots" / "losses.png").size[0] > 400


def test_a_plain_pull_is_enough_for_sample_and_the_store_has_the_plot(trained, dmdr, tmp_path, capsys):
    """`dmdr pull URI --step latest --dest D` then `dmdr sample --run D` (it said "D has no args.json")."""
    moto, uri, cache = trained
    out, err = dmdr(["dmdr", "pull", uri, "--step", "latest", "--dest", "d"])
    assert "Pulled step 2" in out and "warning" not in err
    assert json.loads((tmp_path / "d" / "args.json").read_text())["exp_name"] == "exp"
    assert not list((tmp_path / "d").glob(".dmdr-pull*"))
    dmdr(["dmdr", "sample", "--run", "d", "--prompt", "a red fox", "--out", "s"])
    assert (tmp_path / "s" / "0000.png").is_file()

    # args.json names the training pod's base model and cache: this machine passes its own
    args = json.loads((tmp_path / "d" / "args.json").read_text())
    (tmp_path / "a-file").write_text("")
    args.update(pretrained_model="/opt/pod-only/sdxl-base", cache_dir=str(tmp_path / "a-file" / "cache"))
    (tmp_path / "d" / "args.json").write_text(json.dumps(args))
    assert cli.main(["export", "--run", "d", "--out", "u"]) == 2
    assert "--pretrained-model /opt/pod-only/sdxl-base" in capsys.readouterr().err
    dmdr(["dmdr", "export", "--run", "d", "--out", "u", "--pretrained-model", "builtin:tiny", "--cache-dir", str(cache)])
    assert (tmp_path / "u" / "diffusion_pytorch_model.safetensors").is_file()

    # the plot drawn at sample step 2 went to the store with the samples; `dmdr plot` reads the logs from there
    head = moto.client().head_object(Bucket=uri.split("/")[2], Key="prefix/exp/plots/losses.png")
    assert head["ContentLength"] > 1000
    dmdr(["dmdr", "plot", "--run", uri])
    assert Image.open(tmp_path / "exp-losses.png").size[0] > 400


def test_export_reads_an_s3_run_and_writes_its_result_to_s3(trained, dmdr, tmp_path, capsys):
    """`dmdr export --run s3://... --out s3://...`: the checkpoint is pulled into --cache-dir (once), the
    export folder lands under the key with its dmdr_export.json, and it loads like a local export."""
    from diffusers import UNet2DConditionModel

    moto, uri, cache = trained
    bucket = uri.split("/")[2]
    dest = f"s3://{bucket}/exports/unet-fp32"
    out, _ = dmdr(["dmdr", "export", "--run", uri, "--out", dest, "--dtype", "fp32", "--cache-dir", str(cache)])
    assert dest in out
    keys = sorted(o["Key"] for o in moto.client().list_objects_v2(Bucket=bucket, Prefix="exports/")["Contents"])
    assert keys == ["exports/unet-fp32/config.json", "exports/unet-fp32/diffusion_pytorch_model.safetensors",
                    "exports/unet-fp32/dmdr_export.json"]
    pulled = cache / "s3" / bucket / "prefix" / "exp"
    assert (pulled / "checkpoints" / "step-2.generator.json").is_file()
    assert not (pulled / "checkpoints" / "accelerator_2").exists()  # the generator only, not the optimiser

    local = tmp_path / "dl"
    for key in keys:
        (local / key).parent.mkdir(parents=True, exist_ok=True)
        moto.client().download_file(bucket, key, str(local / key))
    dmdr(["dmdr", "export", "--run", str(pulled), "--out", "here", "--dtype", "fp32"])
    theirs = UNet2DConditionModel.from_pretrained(local / "exports" / "unet-fp32").state_dict()
    ours = UNet2DConditionModel.from_pretrained(tmp_path / "here").state_dict()
    assert theirs.keys() == ours.keys() and all(theirs[k].equal(ours[k]) for k in ours)

    # a single-file export is one object under the key
    dmdr(["dmdr", "export", "--run", uri, "--format", "single-file", "--out", f"s3://{bucket}/exports/dmdr.safetensors",
          "--cache-dir", str(cache)])
    head = moto.client().head_object(Bucket=bucket, Key="exports/dmdr.safetensors")
    assert head["ContentLength"] > 1_000_000

    # a run that is not there: one line naming it, exit 2, nothing left in the bucket
    assert cli.main(["export", "--run", f"s3://{bucket}/prefix/nope", "--out", f"s3://{bucket}/exports/x"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "prefix/nope" in err and "no complete checkpoint" in err
