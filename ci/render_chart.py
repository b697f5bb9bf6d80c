#!/usr/bin/env python3
"""Render, lint and install the dmdr chart with Helm's own engine, without a helm binary.

Helm's Go SDK comes from the helm-python-sdk wheel (import name ``helm_python``). The make
targets in ci/make/helm.mk call this script when the helm CLI is not installed, and
``make k8s-examples`` always uses it, so the rendered examples under k8s/rendered/ are exactly
what tests/integration/test_chart.py renders.

    render_chart.py template [-f VALUES]... [--set K=V]... [--release R] [--namespace N]
    render_chart.py lint [-f VALUES]...
    render_chart.py install --release R [-f VALUES]... [--namespace N]
    render_chart.py examples [--check]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import helm_python as helm

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "dmdr"
EXAMPLE_VALUES = ROOT / "k8s" / "values"
EXAMPLE_RENDERED = ROOT / "k8s" / "rendered"
EXAMPLE_NAMESPACE = "ml"
NOTES = "templates/NOTES.txt"
# Kinds in the order `helm install` creates them; anything else goes last.
KIND_ORDER = ["Namespace", "ServiceAccount", "Secret", "ConfigMap", "PersistentVolumeClaim"]
LINT_WARNING = 2  # helm lint severity: 1 info, 2 warning, 3 error


def merge_values(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge like successive ``-f`` files: maps merge, anything else is replaced."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_values(out[key], value)
        else:
            out[key] = value
    return out


def load_values(files: list[Path] = (), sets: list[str] = ()) -> dict[str, Any]:
    """User values from YAML files then ``--set`` strings, parsed by Helm's own parsers."""
    values: dict[str, Any] = {}
    for path in files:
        values = merge_values(values, helm.values_from_yaml(Path(path).read_text()) or {})
    for item in sets:
        values = merge_values(values, helm.parse_set_string(item))
    return values


def render(values: dict[str, Any] | None = None, *, release: str = "dmdr",
           namespace: str = "default", chart: Path = CHART) -> dict[str, str]:
    """Template path (relative to the chart, e.g. ``templates/pytorchjob.yaml``) -> text.

    Raises helm_python.HelmValuesError for values the schema rejects and HelmRenderError for
    a template ``fail``; empty templates are left out.
    """
    with helm.Chart.load(str(chart)) as loaded:
        prefix = f"{loaded.name}/"
        rendered = loaded.render(values or {}, name=release, namespace=namespace,
                                 is_install=True)
    return {path.removeprefix(prefix): text for path, text in rendered.items() if text.strip()}


def _kind(text: str) -> str:
    for line in text.splitlines():
        if line.startswith("kind:"):
            return line.split(":", 1)[1].strip()
    return ""


def manifest_stream(rendered: dict[str, str]) -> str:
    """The manifests as one YAML stream in install order, NOTES.txt left out."""
    def order(path: str) -> tuple[int, str]:
        kind = _kind(rendered[path])
        return (KIND_ORDER.index(kind) if kind in KIND_ORDER else len(KIND_ORDER), path)

    docs = [f"---\n# Source: {path}\n{rendered[path].strip()}\n"
            for path in sorted((p for p in rendered if p != NOTES), key=order)]
    return "".join(docs)


def lint(values: dict[str, Any] | None = None, chart: Path = CHART) -> list[str]:
    """``helm lint --strict`` findings at warning level or worse, as readable lines."""
    report = helm.lint(str(chart), values or None, strict=True)
    lines = [f"{m['path']}: {m['error']}" for m in report.get("messages", [])
             if m.get("severity", 0) >= LINT_WARNING]
    return lines + list(report.get("errors") or [])


def example_text(values_file: Path) -> str:
    """The committed rendering of one k8s/values/*.yaml example."""
    release = values_file.stem
    header = (f"# Rendered from k8s/values/{values_file.name} (release {release}, namespace "
              f"{EXAMPLE_NAMESPACE}) by `make k8s-examples`. Do not edit: change the values "
              "or the chart and regenerate.\n")
    values = load_values([values_file])
    return header + manifest_stream(render(values, release=release, namespace=EXAMPLE_NAMESPACE))


def examples(check: bool) -> list[str]:
    """Write (or, with check, compare) k8s/rendered/<name>.yaml; returns the stale files."""
    stale = []
    for values_file in sorted(EXAMPLE_VALUES.glob("*.yaml")):
        target = EXAMPLE_RENDERED / values_file.name
        text = example_text(values_file)
        if target.exists() and target.read_text() == text:
            continue
        stale.append(str(target.relative_to(ROOT)))
        if not check:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)
    return stale


def _install(args: argparse.Namespace) -> int:
    values = load_values(args.values, args.set)
    with helm.Config(namespace=args.namespace) as cfg:
        release = cfg.install(str(CHART), args.release, values, namespace=args.namespace)
    info = release.get("info") or {}
    print(f"release {args.release}: {info.get('status', 'installed')}\n{info.get('notes', '')}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("template", "lint", "install"):
        cmd = sub.add_parser(name)
        cmd.add_argument("-f", "--values", type=Path, action="append", default=[])
        cmd.add_argument("--set", action="append", default=[])
        cmd.add_argument("--release", default="dmdr", required=name == "install")
        cmd.add_argument("--namespace", default="default")
    sub.add_parser("examples").add_argument("--check", action="store_true")
    args = parser.parse_args(argv)

    try:
        if args.command == "template":
            rendered = render(load_values(args.values, args.set), release=args.release,
                              namespace=args.namespace)
            sys.stdout.write(manifest_stream(rendered))
        elif args.command == "lint":
            findings = lint(load_values(args.values, args.set))
            print("\n".join(findings) or f"{CHART.relative_to(ROOT)}: lint clean")
            return 1 if findings else 0
        elif args.command == "install":
            return _install(args)
        else:
            stale = examples(args.check)
            if args.check and stale:
                print("stale rendered examples: " + ", ".join(stale)
                      + "\nregenerate them with `make k8s-examples`", file=sys.stderr)
                return 1
            print("\n".join(f"wrote {path}" for path in stale) or "k8s/rendered is up to date")
    except helm.HelmError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
