"""A disk that refuses writes ends the trainer with one line naming the path and the cause (exit 2);
a save that failed midway leaves no marker, so the next resume ignores it."""
import resource
import signal
import subprocess

import pytest

from helpers_train import DMDR, REPO, env, run_dmdr, tiny_args

pytestmark = pytest.mark.slow


def _limit_file_size():  # like a full disk: writes past 3 MB fail (EFBIG instead of ENOSPC)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (3_000_000, 3_000_000))


def test_disk_full_during_save_is_one_line_and_leaves_no_marker(tmp_path):
    cache = tmp_path / "cache"
    run_dmdr(tiny_args(tmp_path / "warm", "w", cache, "--max-train-steps", "1"), cache)  # the model cache, unlimited
    proc = subprocess.run(DMDR + tiny_args(tmp_path, "full", cache, "--max-train-steps", "2", "--checkpoint-steps", "1",
                                           "--sample-steps", "1000"),
                          capture_output=True, text=True, env=env(cache), cwd=REPO, timeout=600,
                          preexec_fn=_limit_file_size)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    error = proc.stderr.strip().splitlines()[-1]
    assert error.startswith("dmdr train: error: saving checkpoint step-1 in ") and "File too large" in error, error
    assert not list((tmp_path / "full" / "checkpoints").glob("step-*.complete.json"))


def test_unwritable_output_dir_is_one_line(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    proc = subprocess.run(DMDR + tiny_args(tmp_path / "file", "x", tmp_path / "cache"), capture_output=True, text=True,
                          env=env(tmp_path / "cache"), cwd=REPO, timeout=600)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(f"dmdr train: error: Not a directory: {tmp_path / 'file'}")
