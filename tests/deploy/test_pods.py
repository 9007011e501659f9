"""Every pod the chart renders is locked down, probed, sized and wired to things that exist."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from api.settings import ApiSettings
from dspy_fleet.settings import WorkerSettings
from tests.deploy.conftest import Manifest, RenderFn, by_kind, component, pod_specs

# DSPY_FLEET_* names the processes read, plus the ones read elsewhere: the config
# file's ${DSPY_FLEET_MOCK_LLM_URL}, and the API keys the auth issue will consume.
KNOWN_ENV = {
    f"DSPY_FLEET_{name.upper()}"
    for cls in (ApiSettings, WorkerSettings)
    for name in cls.model_fields
} | {"DSPY_FLEET_MOCK_LLM_URL", "DSPY_FLEET_API_KEYS"}


def probe_path(container: Manifest, kind: str) -> tuple[str, Any]:
    """(path, port) of an httpGet probe."""
    http = container[kind]["httpGet"]
    return http["path"], http["port"]


def check_pod(name: str, meta: Manifest, spec: Manifest, docs: list[Manifest]) -> None:
    """All the rules for one pod; raises AssertionError naming the pod."""
    pod_sc = spec.get("securityContext", {})
    assert pod_sc.get("runAsNonRoot") is True, f"{name}: runAsNonRoot"
    assert isinstance(pod_sc.get("runAsUser"), int) and pod_sc["runAsUser"] > 0, f"{name}: uid"
    assert spec.get("automountServiceAccountToken") is False, f"{name}: token mounted"
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    claims = {c["metadata"]["name"] for c in spec.get("_claims", [])}
    is_test = meta.get("annotations", {}).get("helm.sh/hook") == "test"
    for c in spec.get("initContainers", []) + spec["containers"]:
        where = f"{name}/{c['name']}"
        sc = c.get("securityContext", {})
        assert sc.get("readOnlyRootFilesystem") is True, f"{where}: writable root FS"
        assert sc.get("allowPrivilegeEscalation") is False, f"{where}: privilege escalation"
        assert "ALL" in sc.get("capabilities", {}).get("drop", []), f"{where}: capabilities"
        assert sc.get("privileged") is not True, f"{where}: privileged"
        res = c.get("resources", {})
        assert res.get("requests", {}).get("memory"), f"{where}: no memory request"
        assert res.get("requests", {}).get("cpu"), f"{where}: no cpu request"
        assert res.get("limits", {}).get("memory"), f"{where}: no memory limit"
        image = c["image"]
        assert ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"), f"{where}: tag"
        for mount in c.get("volumeMounts", []):
            assert mount["name"] in volumes or mount["name"] in claims, f"{where}: {mount['name']}"
        port_names = {p["name"] for p in c.get("ports", [])}
        if not is_test:
            for kind in ("livenessProbe", "readinessProbe"):
                assert kind in c, f"{where}: no {kind}"
                port = c[kind].get("httpGet", {}).get("port")
                if isinstance(port, str):
                    assert port in port_names, f"{where}: {kind} port {port} not declared"
        for env in c.get("env", []):
            if env["name"].startswith("DSPY_FLEET_"):
                assert env["name"] in KNOWN_ENV, f"{where}: unknown setting {env['name']}"
            check_env_source(where, env, docs)
    for vol in volumes.values():
        if "configMap" in vol:
            names = {d["metadata"]["name"] for d in by_kind(docs, "ConfigMap")}
            assert vol["configMap"]["name"] in names, f"{name}: ConfigMap {vol['configMap']}"


def check_env_source(where: str, env: Manifest, docs: list[Manifest]) -> None:
    """A secretKeyRef to the chart's own Secret names a key that Secret has (unless optional)."""
    ref = env.get("valueFrom", {}).get("secretKeyRef")
    if not ref or ref.get("optional"):
        return
    chart_secrets = {s["metadata"]["name"]: s for s in by_kind(docs, "Secret")}
    if ref["name"] in chart_secrets:
        assert ref["key"] in (chart_secrets[ref["name"]].get("data") or {}), f"{where}: {ref}"


def all_pods(docs: list[Manifest]) -> list[tuple[str, Manifest, Manifest]]:
    """Pod specs, with each StatefulSet's volumeClaimTemplates attached for the mount check."""
    out = []
    for name, meta, spec in pod_specs(docs):
        spec = dict(spec)
        for d in by_kind(docs, "StatefulSet"):
            if name == f"StatefulSet/{d['metadata']['name']}":
                spec["_claims"] = d["spec"].get("volumeClaimTemplates", [])
        out.append((name, meta, spec))
    return out


def test_every_pod_is_non_root_read_only_probed_and_sized(release: Any) -> None:
    _, _, docs = release
    pods = all_pods(docs)
    assert len(pods) >= 3
    for name, meta, spec in pods:
        check_pod(name, meta, spec, docs)


def test_api_probes_health_and_ready(release: Any) -> None:
    _, _, docs = release
    api = component(docs, "Deployment", "api")["spec"]["template"]["spec"]["containers"][0]
    assert probe_path(api, "livenessProbe") == ("/health", "http")
    assert probe_path(api, "readinessProbe") == ("/ready", "http")
    assert {"name": "http", "containerPort": 8080, "protocol": "TCP"} in api["ports"]
    env = {e["name"]: e.get("value") for e in api["env"]}
    assert env["DSPY_FLEET_API_HOST"] == "0.0.0.0"  # the default 127.0.0.1 is unreachable
    assert api["args"] == ["dspy-fleet", "api"]


def test_worker_liveness_is_health_on_the_metrics_port(release: Any) -> None:
    _, _, docs = release
    worker = component(docs, "Deployment", "worker")["spec"]["template"]["spec"]["containers"][0]
    assert probe_path(worker, "livenessProbe") == ("/health", "metrics")
    env = {e["name"]: e.get("value") for e in worker["env"]}
    port = next(p for p in worker["ports"] if p["name"] == "metrics")["containerPort"]
    assert str(port) == env["DSPY_FLEET_METRICS_PORT"]
    assert env["DSPY_FLEET_METRICS_HOST"] == "0.0.0.0"  # the default 127.0.0.1 is unreachable
    assert worker["args"] == ["dspy-fleet", "worker"]


def test_read_only_pods_get_a_writable_tmp(release: Any) -> None:
    _, _, docs = release
    for comp in ("api", "worker"):
        spec = component(docs, "Deployment", comp)["spec"]["template"]["spec"]
        mounts = {m["mountPath"]: m["name"] for m in spec["containers"][0]["volumeMounts"]}
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert "emptyDir" in volumes[mounts["/tmp"]]
        assert mounts["/etc/dspy-fleet"] == "config"


def test_services_select_pods_and_target_declared_ports(release: Any) -> None:
    _, _, docs = release
    pods = pod_specs(docs)
    for svc in by_kind(docs, "Service"):
        selector = svc["spec"]["selector"]
        matching = [spec for _, meta, spec in pods if selector.items() <= meta["labels"].items()]
        assert matching, f"Service {svc['metadata']['name']} selects no pod"
        declared = {
            p["name"] for spec in matching for c in spec["containers"] for p in c.get("ports", [])
        }
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in declared, f"{svc['metadata']['name']}: {port}"


def test_the_helm_test_pod_curls_ready(render: RenderFn) -> None:
    docs = render(None)
    pod = next(
        d for d in by_kind(docs, "Pod") if d["metadata"]["annotations"]["helm.sh/hook"] == "test"
    )
    args = pod["spec"]["containers"][0]["args"]
    api_svc = component(docs, "Service", "api")
    port = api_svc["spec"]["ports"][0]["port"]
    assert args[-1] == f"http://{api_svc['metadata']['name']}:{port}/ready"
    assert "--fail" in args


@pytest.mark.parametrize(
    "breakage",
    [
        lambda s: s["containers"][0]["securityContext"].update(readOnlyRootFilesystem=False),
        lambda s: s["securityContext"].pop("runAsNonRoot"),
        lambda s: s["containers"][0].pop("readinessProbe"),
        lambda s: s["containers"][0]["resources"].pop("limits"),
        lambda s: s["containers"][0]["securityContext"]["capabilities"].update(drop=[]),
        lambda s: s["containers"][0]["env"].append({"name": "DSPY_FLEET_CONCURENCY", "value": "1"}),
        lambda s: s["containers"][0]["livenessProbe"]["httpGet"].update(port="web"),
    ],
)
def test_the_pod_walker_catches_each_violation(render: RenderFn, breakage: Any) -> None:
    """Control: every rule above fails on a pod broken in that one way."""
    docs = render(None)
    spec = copy.deepcopy(component(docs, "Deployment", "worker")["spec"]["template"]["spec"])
    breakage(spec)
    with pytest.raises(AssertionError):
        check_pod("worker", {}, spec, docs)
