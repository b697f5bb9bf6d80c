"""`dmdr eval --run s3://...` against moto (checkpoints pulled one at a time, eval/ written back),
and `--watch` on a run whose checkpoints arrive between polls (backoff, timeout, last step)."""
from __future__ import annotations

import json
import shutil

import pytest

from dmdr import cli
from dmdr.evaluation import cli as eval_cli
from dmdr.evaluation.run import Evaluator
from dmdr.models.tiny_clip import write_tiny_reward_checkpoints
from helpers_eval import write_tiny_extractor
from helpers_rewards import colour_images, write_pngs
from helpers_s3 import aws_env, shared_moto
from helpers_train import env, readme_commands, train_tiny_into_store

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny run with checkpoints at 1 and 2, trained with --s3-uri s3://<bucket>/prefix."""
    moto = shared_moto()
    base = tmp_path_factory.mktemp("evals3")
    bucket, cache = train_tiny_into_store(moto, base, "--checkpoint-steps", "1", "--sample-steps", "100")
    tiny = write_tiny_reward_checkpoints(base / "models", seed=3)
    (base / "prompts.txt").write_text("a red fox\na blue boat\n", encoding="utf-8")
    return moto, bucket, base, cache, tiny


@pytest.fixture
def dmdr_env(trained, monkeypatch):
    moto, _, _, cache, _ = trained
    for key, value in env(cache, **aws_env({"AWS_ENDPOINT_URL": moto.endpoint})).items():
        monkeypatch.setenv(key, value)


def _args(trained, run, *extra):
    _, _, base, _, tiny = trained
    return ["eval", "--run", str(run), "--prompts", str(base / "prompts.txt"), "--metrics", "clip",
            "--device", "cpu", "--clip-reward-model", str(tiny["clip"]), "--clip-reward-arch", str(tiny["config"]),
            *extra]


def _rows(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


def test_eval_of_an_s3_run_writes_eval_back_and_a_new_cache_continues(trained, dmdr_env, tmp_path, capsys):
    moto, bucket, _, _, _ = trained
    uri = f"s3://{bucket}/prefix/exp"
    cache1 = tmp_path / "c1"
    assert cli.main(_args(trained, uri, "--steps", "1", "--local-cache", str(cache1))) == 0
    s3 = moto.client()
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="prefix/exp/eval/")["Contents"]}
    assert keys == {f"prefix/exp/eval/metrics.{x}" for x in ("jsonl", "csv", "png")}
    body = s3.get_object(Bucket=bucket, Key="prefix/exp/eval/metrics.jsonl")["Body"].read().decode()
    assert [r["step"] for r in _rows(body)] == [1]
    # only the generator was pulled, and dropped once evaluated: no checkpoint left in the cache
    local = cache1 / bucket / "prefix" / "exp"
    assert (local / "args.json").is_file() and not list((local / "checkpoints").rglob("*.safetensors"))

    # another machine (empty cache): step 1 is in the store's metrics.jsonl, only step 2 is evaluated
    capsys.readouterr()
    assert cli.main(_args(trained, uri, "--steps", "all", "--local-cache", str(tmp_path / "c2"))) == 0
    out = capsys.readouterr().out
    assert "step 1:" not in out and "step 2: 2/2 images sampled and scored" in out
    body = s3.get_object(Bucket=bucket, Key="prefix/exp/eval/metrics.jsonl")["Body"].read().decode()
    assert [r["step"] for r in _rows(body)] == [1, 2] and _rows(body)[0] == _rows(
        (local / "eval" / "metrics.jsonl").read_text())[0]

    assert cli.main(_args(trained, f"s3://{bucket}/prefix/nothing", "--local-cache", str(tmp_path / "c3"))) == 2
    assert "has no args.json" in capsys.readouterr().err


class Clock:
    """A fake clock that `sleep` advances; `on_sleep` runs at each sleep (checkpoints arriving)."""

    def __init__(self, on_sleep=None):
        self.now, self.slept, self.on_sleep = 0.0, [], on_sleep

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds
        if self.on_sleep:
            self.on_sleep(len(self.slept))


def _watch(trained, run, clock, *extra) -> int:
    args = cli.build_parser().parse_args(_args(trained, run, "--watch", "--poll-interval", "0.5",
                                               "--max-poll-interval", "2", *extra))
    evaluator = Evaluator(eval_cli.settings_from_args(args))
    overrides = {"pretrained_model": None, "cache_dir": None}
    return eval_cli.watch(eval_cli.open_run(args), evaluator, overrides, args, sleep=clock.sleep,
                          clock=lambda: clock.now)


def test_watch_evaluates_checkpoints_as_they_land_until_the_last_step(trained, dmdr_env, tmp_path, capsys):
    _, _, base, _, _ = trained
    run = tmp_path / "exp"
    shutil.copytree(base / "pod" / "exp", run)
    marker = run / "checkpoints" / "step-2.complete.json"
    hidden = tmp_path / "step-2.complete.json"
    marker.rename(hidden)  # step 2 is being written: not a checkpoint yet

    # the run dies before its last step: backoff 0.5, 1, 2, 2 (the cap), then --watch-timeout 5 ends it
    clock = Clock()
    assert _watch(trained, run, clock, "--watch-timeout", "5") == 0
    out = capsys.readouterr().out
    assert clock.slept == [0.5, 1, 2, 2] and "--watch-timeout" in out
    assert [r["step"] for r in _rows((run / "eval" / "metrics.jsonl").read_text())] == [1]

    # watching again: step 1 is done; step 2 lands during the second wait, then the run is complete
    clock = Clock(on_sleep=lambda n: n == 2 and hidden.rename(marker))
    assert _watch(trained, run, clock) == 0
    out = capsys.readouterr().out
    assert clock.slept == [0.5, 1] and "step 1:" not in out and "step 2: 2/2 images" in out
    assert "reached its last step (2)" in out
    assert [r["step"] for r in _rows((run / "eval" / "metrics.jsonl").read_text())] == [1, 2]


def test_watch_waits_for_a_run_that_has_not_started(trained, dmdr_env, tmp_path, capsys):
    _, _, base, _, _ = trained
    run = tmp_path / "later"

    def start(n):
        if n == 1:
            shutil.copytree(base / "pod" / "exp", run)

    clock = Clock(on_sleep=start)
    assert _watch(trained, run, clock) == 0
    assert clock.slept == [0.5] and "reached its last step (2)" in capsys.readouterr().out


def test_readme_eval_commands(trained, dmdr_env, tmp_path, monkeypatch, capsys):
    """The README's "Evaluating" lines as written, in an empty folder, the store's bucket for
    s3://bucket, tiny models under the file names the README relies on, 3 images per step."""
    moto, bucket, _, _, tiny = trained
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))  # the default --local-cache
    for name, target in (("Apple_CLIP-H-14-224.bin", tiny["clip"]), ("HPS_v2.1_compressed.pt", tiny["hps"]),
                         ("inception-2015-12-05.pt", write_tiny_extractor(tmp_path / "m" / "tiny.pt"))):
        (tmp_path / name).symlink_to(target)
    (tmp_path / "prompts.txt").write_text("a red fox\na blue boat\n", encoding="utf-8")
    write_pngs(tmp_path / "ref", colour_images(size=64)[0], [f"{i}.png" for i in range(4)])
    commands = readme_commands("### Evaluating")
    assert [c[1] for c in commands] == ["pull", "eval", "eval", "eval"]
    for argv in commands:
        argv = [a.replace("s3://bucket/", f"s3://{bucket}/") for a in argv]
        if argv[1] == "eval":
            argv[argv.index("--num-images") + 1] = "3"
            argv += ["--clip-reward-arch", str(tiny["config"]), "--hps-reward-arch", str(tiny["config"])]
        assert cli.main(argv[1:]) == 0, argv
    out = capsys.readouterr().out
    assert "reached its last step (2)" in out
    local = _rows((tmp_path / "runs" / "exp" / "eval" / "metrics.jsonl").read_text())
    assert [r["step"] for r in local] == [2]  # the pull brought the latest step only
    body = moto.client().get_object(Bucket=bucket, Key="prefix/exp/eval/metrics.jsonl")["Body"].read().decode()
    remote = _rows(body)
    assert [r["step"] for r in remote] == [1, 2] and all({"clip", "hps", "fid"} <= set(r) for r in remote)
    assert remote[1]["fid"] == pytest.approx(local[0]["fid"], rel=1e-5)  # same images, same reference
