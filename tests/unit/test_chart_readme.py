"""charts/dmdr/README.md's values table is generated from values.yaml (ci/chart_readme.py,
`make chart-readme`) and must not fall behind it."""
from __future__ import annotations

import shutil
from pathlib import Path

import helpers_helm as h

ROOT = Path(__file__).resolve().parents[2]


def _generator():
    return h.load_ci_script("chart_readme")


def test_chart_readme_values_table_is_up_to_date():
    gen = _generator()
    readme = gen.README.read_text()
    assert gen.updated(readme) == readme, "charts/dmdr/README.md is stale: run `make chart-readme`"
    assert gen.main(["--check"]) == 0


def test_every_documented_value_is_a_row_with_its_default_and_type():
    gen = _generator()
    table = gen.table()
    assert "| `training.initCkpt` | string | `\"\"` | Checkpoint a NEW run starts from" in table
    assert "| `job.replicas` | integer | `1` |" in table
    assert "| `podAnnotations` | object | `{\"sidecar.istio.io/inject\": \"false\"}` |" in table
    assert "| `elastic.rdzvConf.join_timeout` | integer/null | `1800` |" in table


def test_a_changed_comment_makes_the_readme_stale(tmp_path, monkeypatch, capsys):
    gen = _generator()
    chart = tmp_path / "dmdr"
    shutil.copytree(gen.CHART, chart)
    values = chart / "values.yaml"
    values.write_text(values.read_text().replace("# -- Fewest pods training may run with.",
                                                 "# -- Fewest pods, changed."))
    monkeypatch.setattr(gen, "CHART", chart)
    monkeypatch.setattr(gen, "README", chart / "README.md")
    monkeypatch.setattr(gen, "ROOT", tmp_path)
    assert gen.main(["--check"]) == 1
    assert "run `make chart-readme`" in capsys.readouterr().err
    assert gen.main([]) == 0 and gen.main(["--check"]) == 0
    assert "Fewest pods, changed." in (chart / "README.md").read_text()
