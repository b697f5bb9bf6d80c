"""Bad input is refused before any work: one line, exit 2 (dmdr.config validation)."""
import pytest

from dmdr.cli import main


@pytest.mark.parametrize("args, message", [
    (["--resume-ckpt", ""], "--resume-ckpt: the value is empty"),
    (["--init-ckpt", ""], "--init-ckpt: the value is empty"),
    (["--learning-rate-gen", "nan"], "--learning-rate-gen: nan is not a finite number"),
    (["--learning-rate-gen", "inf"], "--learning-rate-gen: inf is not a finite number"),
    (["--shift", "nan"], "--shift: nan is not a finite number"),
    (["--exp-name", ""], "--exp-name: '' must be one folder name"),
    (["--exp-name", "../../escape"], "--exp-name: '../../escape' must be one folder name"),
    (["--exp-name", ".."], "--exp-name: '..' must be one folder name"),
])
def test_refused_at_once(args, message, capsys, tmp_path):
    assert main(["train", "--preset", "tiny", "--output-dir", str(tmp_path), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


@pytest.mark.parametrize("line, message", [
    ("max_train_steps: true", "--max-train-steps: True is not a valid int"),
    ("learning_rate_gen: .nan", "--learning-rate-gen: nan is not a finite number"),
    ("shift: false", "--shift: False is not a valid float"),
])
def test_config_file_values_refused_at_once(line, message, capsys, tmp_path):
    (tmp_path / "c.yaml").write_text(line + "\n")
    assert main(["train", "--preset", "tiny", "--output-dir", str(tmp_path), "--config", str(tmp_path / "c.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
