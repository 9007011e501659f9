"""Lint or render helm/dspy-fleet with the Helm v4 library (helm-python-sdk): no helm binary.

    python helm/chart.py lint
    python helm/chart.py template [-f values.yaml ...] [--name fleet] [--namespace dspy]

Used by `make helm-lint` and `make helm-template`; exits 1 on lint errors or a failed render.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import helm_python
import yaml

CHART = Path(__file__).resolve().parent / "dspy-fleet"
KUBE_VERSION = "v1.30.0"


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge values files the way `helm -f a -f b` does (later files win)."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def lint(values: dict[str, Any]) -> int:
    """Print helm lint's findings (strict: warnings count); 1 if there is any."""
    report = helm_python.lint(CHART, values or None, strict=True, kube_version=KUBE_VERSION)
    problems = [m for m in report["messages"] if m["severity"] >= 2] + [
        {"severity": 3, "path": "", "error": e} for e in report["errors"]
    ]
    for m in report["messages"]:
        print(f"[{m['severity']}] {m['path']}: {m['error']}")
    for e in report["errors"]:
        print(f"[error] {e}")
    print(f"{report['total_charts_linted']} chart(s) linted, {len(problems)} problem(s)")
    return 1 if problems else 0


def template(values: dict[str, Any], name: str, namespace: str) -> int:
    """Print every rendered manifest, like `helm template`."""
    chart = helm_python.Chart.load(CHART)
    try:
        rendered = chart.render(values, name=name, namespace=namespace, is_install=True)
    except helm_python.HelmError as exc:
        print(f"render failed: {exc}", file=sys.stderr)
        return 1
    for path in sorted(rendered):
        if path.endswith("NOTES.txt") or not rendered[path].strip():
            continue
        print(f"---\n# Source: {path}\n{rendered[path].strip()}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["lint", "template"])
    parser.add_argument("-f", "--values", action="append", default=[], type=Path)
    parser.add_argument("--name", default="dspy-fleet")
    parser.add_argument("--namespace", default="default")
    args = parser.parse_args(argv)
    values: dict[str, Any] = {}
    for path in args.values:
        values = merge(values, yaml.safe_load(path.read_text()) or {})
    if args.command == "lint":
        return lint(values)
    return template(values, args.name, args.namespace)


if __name__ == "__main__":
    sys.exit(main())
