"""Bad input is refused before any work: one line, exit 2 (dmdr.config validation)."""
import pytest

from dmdr.cli import main


@pytest.mark.parametrize("args, message", [
    (["--resume-ckpt", ""], "--resume-ckpt: the value is empty"),
    (["--init-ckpt", ""], "--init-ckpt: the value is empty"),
])
def test_refused_at_once(args, message, capsys, tmp_path):
    assert main(["train", "--preset", "tiny", "--output-dir", str(tmp_path), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
