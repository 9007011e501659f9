"""Fixtures for the deployment files: the chart rendered offline, the compose file, tool paths.

Nothing here needs Docker, a cluster or the network: the Helm v4 library
(helm-python-sdk) renders the chart, and the validators run from .venv.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import helm_python
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART_DIR = ROOT / "helm" / "dspy-fleet"


def _load_chart_tool() -> ModuleType:
    """helm/chart.py (what `make helm-lint` runs): a script, not a package, so load it by path."""
    spec = importlib.util.spec_from_file_location("helm_chart_tool", ROOT / "helm" / "chart.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# Merge values files the way `helm -f a -f b` does: the same function the make targets use.
deep_merge = _load_chart_tool().merge
PRODUCTION_VALUES = ROOT / "helm" / "examples" / "values-production.yaml"
RELEASE = "fleet"
NAMESPACE = "dspy"
KUBE_VERSION = "1.30.0"

Manifest = dict[str, Any]


def tool(name: str) -> str:
    """Path of a validator installed into the running venv (else from PATH)."""
    candidate = Path(sys.executable).parent / name
    found = str(candidate) if candidate.exists() else shutil.which(name)
    if not found:
        pytest.fail(f"{name} is not installed: pip install -e '.[dev]'")
    return found


@pytest.fixture(scope="session")
def chart() -> Iterator[helm_python.Chart]:
    """The chart, loaded once."""
    loaded = helm_python.Chart.load(CHART_DIR)
    yield loaded
    loaded.close()


@pytest.fixture(scope="session")
def production_values() -> dict[str, Any]:
    """The example production values file."""
    return yaml.safe_load(PRODUCTION_VALUES.read_text())


RenderFn = Callable[[dict[str, Any] | None], list[Manifest]]


@pytest.fixture(scope="session")
def render(chart: helm_python.Chart) -> RenderFn:
    """Render the chart with these values (like `helm template`); every manifest as a dict."""

    def _render(values: dict[str, Any] | None = None) -> list[Manifest]:
        rendered = chart.render(values or {}, name=RELEASE, namespace=NAMESPACE, is_install=True)
        docs: list[Manifest] = []
        for path, text in sorted(rendered.items()):
            if path.endswith("NOTES.txt"):
                continue
            docs.extend(d for d in yaml.safe_load_all(text) if d)
        return docs

    return _render


# Value sets every structural test runs over: the defaults, the production
# example, and everything optional switched on (both worker-scaling modes).
EVERYTHING_ON = {
    "flower": {"enabled": True},
    "serviceMonitor": {"enabled": True},
    "redis": {"persistence": {"enabled": True}},
    "worker": {"autoscaling": {"enabled": True, "mode": "keda"}},
    "secrets": {"apiKeys": "k", "providerApiKeys": {"OPENAI_API_KEY": "sk-test"}},
    "commonAnnotations": {"team": "ml"},
    # Prometheus and the Flower users are named: metrics ports and Flower accept no one otherwise.
    "networkPolicy": {
        "metricsFrom": [
            {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
        ],
        "flowerFrom": [{"podSelector": {"matchLabels": {"role": "ops-console"}}}],
    },
}
HPA_MODE = {"worker": {"autoscaling": {"enabled": True, "mode": "hpa"}}}


@pytest.fixture(scope="session", params=["default", "production", "everything-on", "hpa-mode"])
def release(request: pytest.FixtureRequest, render: RenderFn, production_values: dict) -> Any:
    """(name, values, manifests) for each value set."""
    values = {
        "default": {},
        "production": production_values,
        "everything-on": EVERYTHING_ON,
        "hpa-mode": HPA_MODE,
    }[request.param]
    return request.param, values, render(values)


def by_kind(docs: list[Manifest], kind: str) -> list[Manifest]:
    """The manifests of one kind."""
    return [d for d in docs if d["kind"] == kind]


def pod_specs(docs: list[Manifest]) -> list[tuple[str, Manifest, Manifest]]:
    """(workload name, pod metadata, pod spec) of every pod the manifests create."""
    out = []
    for d in docs:
        if d["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            tmpl = d["spec"]["template"]
            out.append((f"{d['kind']}/{d['metadata']['name']}", tmpl["metadata"], tmpl["spec"]))
        elif d["kind"] == "Pod":
            out.append((f"Pod/{d['metadata']['name']}", d["metadata"], d["spec"]))
    return out


def component(docs: list[Manifest], kind: str, name: str) -> Manifest:
    """The one manifest of this kind whose app.kubernetes.io/component is ``name``."""
    found = [
        d
        for d in by_kind(docs, kind)
        if d["metadata"]["labels"].get("app.kubernetes.io/component") == name
    ]
    assert len(found) == 1, f"expected one {kind} for component {name}, got {len(found)}"
    return found[0]
