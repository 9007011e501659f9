"""The Helm chart renders, lints clean, validates against Kubernetes 1.30 and refuses bad values."""

from __future__ import annotations

import contextlib
import copy
import re
import subprocess
import sys
from typing import Any

import helm_python
import pytest
import yaml
from kubernetes_validate import utils as kv

from tests.deploy.conftest import (
    CHART_DIR,
    KUBE_VERSION,
    NAMESPACE,
    PRODUCTION_VALUES,
    ROOT,
    Manifest,
    RenderFn,
    by_kind,
    component,
    deep_merge,
    tool,
)
from tests.deploy.test_chart_security import check_no_secret_on_command_lines

# Kinds kubernetes-validate has no schema for; our own checks below cover them.
CRD_KINDS = {"ServiceMonitor", "ScaledObject", "TriggerAuthentication"}

MONITORING = ROOT / "monitoring"
# The scrape jobs of monitoring/prometheus.yml: the names its alert rules match on `job`.
PROMETHEUS_JOBS = {
    job["job_name"]
    for job in yaml.safe_load((MONITORING / "prometheus.yml").read_text())["scrape_configs"]
}


def test_default_values_render_a_working_trial(render: RenderFn) -> None:
    docs = render(None)
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "Service", "ConfigMap", "StatefulSet", "HorizontalPodAutoscaler"} <= kinds
    for name in ("api", "worker", "mock-llm", "celery-exporter"):
        component(docs, "Deployment", name)
    component(docs, "StatefulSet", "redis")


def test_production_example_renders_without_trial_parts(
    render: RenderFn, production_values: dict
) -> None:
    docs = render(production_values)
    names = {d["metadata"]["labels"].get("app.kubernetes.io/component") for d in docs}
    assert "redis" not in names and "mock-llm" not in names
    assert by_kind(docs, "Secret") == []  # existingSecret: the chart creates none
    api = component(docs, "Deployment", "api")
    env = {e["name"]: e for e in api["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["DSPY_FLEET_ENV"]["value"] == "production"
    assert env["DSPY_FLEET_REDIS_URL"]["valueFrom"]["secretKeyRef"] == {
        "name": "dspy-fleet-secrets",
        "key": "redis-url",
    }
    # In production the API keys are not optional: a missing key stops the pod.
    assert env["DSPY_FLEET_API_KEYS"]["valueFrom"]["secretKeyRef"]["optional"] is False


@pytest.mark.parametrize("values_file", [None, PRODUCTION_VALUES], ids=["default", "production"])
def test_helm_lint_strict_is_clean(values_file: Any) -> None:
    values = yaml.safe_load(values_file.read_text()) if values_file else None
    report = helm_python.lint(
        CHART_DIR, values, strict=True, namespace=NAMESPACE, kube_version=f"v{KUBE_VERSION}"
    )
    assert report["total_charts_linted"] == 1
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


def test_every_manifest_passes_kubernetes_validate_strict(release: Any) -> None:
    name, _, docs = release
    no_schema = set()
    for doc in docs:
        try:
            kv.validate(doc, KUBE_VERSION, strict=True)
        except kv.SchemaNotFoundError:
            no_schema.add(doc["kind"])
        except kv.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{name}: {doc['kind']}/{doc['metadata']['name']} at {path}: {exc.message}")
    # Anything without a schema must be a CRD we check ourselves.
    assert no_schema <= CRD_KINDS


def test_kubernetes_validate_is_strict_here(render: RenderFn) -> None:
    """Control: an unknown field in a rendered Deployment is rejected (the check can fail)."""
    deployment = copy.deepcopy(component(render(None), "Deployment", "api"))
    deployment["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGett"] = {}
    with pytest.raises(kv.ValidationError):
        kv.validate(deployment, KUBE_VERSION, strict=True)


def test_make_helm_template_output_passes_the_cli(tmp_path: Any) -> None:
    """`make helm-template` output for production passes the kubernetes-validate CLI."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "helm" / "chart.py"), "template", "-f", str(PRODUCTION_VALUES)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    manifest = tmp_path / "production.yaml"
    manifest.write_text(out)
    assert len([d for d in yaml.safe_load_all(out) if d]) >= 15
    result = subprocess.run(
        [tool("kubernetes-validate"), "-k", KUBE_VERSION, "--strict", "--quiet", str(manifest)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    warned = set(re.findall(r"for kind (\w+) with api version", result.stdout))
    assert warned <= CRD_KINDS, result.stdout


# --- CRDs: kubernetes-validate has no schema for them, so we check what the operators need.


def check_service_monitor(sm: Manifest, docs: list[Manifest]) -> None:
    """A ServiceMonitor selects exactly one rendered Service and scrapes a port it has."""
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    spec = sm["spec"]
    selector = spec["selector"]["matchLabels"]
    assert selector, "empty selector would scrape every Service"
    services = [
        s for s in by_kind(docs, "Service") if selector.items() <= s["metadata"]["labels"].items()
    ]
    assert len(services) == 1, f"{sm['metadata']['name']} selects {len(services)} Services"
    port_names = {p["name"] for p in services[0]["spec"]["ports"]}
    assert spec["namespaceSelector"]["matchNames"] == [NAMESPACE]
    assert spec["endpoints"], "no endpoints"
    for ep in spec["endpoints"]:
        assert ep["port"] in port_names, f"port {ep['port']!r} not in {port_names}"
        assert ep["path"] == "/metrics"
        assert re.fullmatch(r"\d+[sm]", ep["interval"])
    # The Prometheus Operator names the job after the Service unless jobLabel names one of
    # its labels: the alert rules' `job` matchers would then match nothing.
    job = services[0]["metadata"]["labels"].get(spec.get("jobLabel", ""))
    assert job in PROMETHEUS_JOBS, f"{sm['metadata']['name']}: job {job!r}"


def check_scaled_object(so: Manifest, docs: list[Manifest]) -> None:
    """A KEDA ScaledObject targets the worker Deployment and watches each of its queues."""
    assert so["apiVersion"] == "keda.sh/v1alpha1"
    spec = so["spec"]
    target = spec["scaleTargetRef"]
    deployments = {d["metadata"]["name"]: d for d in by_kind(docs, "Deployment")}
    assert target["name"] in deployments, f"scaleTargetRef {target['name']} not rendered"
    worker = deployments[target["name"]]
    assert worker["metadata"]["labels"]["app.kubernetes.io/component"] == "worker"
    assert "replicas" not in worker["spec"], "KEDA owns the replica count"
    assert 0 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    env = {
        e["name"]: e.get("value")
        for e in worker["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    queues = set(env["DSPY_FLEET_QUEUES"].split(","))
    assert spec["triggers"]
    watched = set()
    for trig in spec["triggers"]:
        assert trig["type"] == "redis"
        meta = trig["metadata"]
        # KEDA rejects non-string metadata values.
        assert all(isinstance(v, str) for v in meta.values()), meta
        assert re.fullmatch(r"[A-Za-z0-9.-]+:\d+", meta["address"])
        assert meta["listLength"].isdigit() and int(meta["listLength"]) > 0
        watched.add(meta["listName"])
    assert watched == queues
    # The in-chart Redis requires a password: KEDA must authenticate with a rendered one.
    in_chart = {
        s["metadata"]["name"]
        for s in by_kind(docs, "Service")
        if s["metadata"]["labels"]["app.kubernetes.io/component"] == "redis"
    }
    auth_names = {t["metadata"]["name"] for t in by_kind(docs, "TriggerAuthentication")}
    for trig in spec["triggers"]:
        if trig["metadata"]["address"].split(":")[0] in in_chart:
            assert trig.get("authenticationRef", {}).get("name") in auth_names, trig


def check_trigger_authentication(ta: Manifest, docs: list[Manifest]) -> None:
    """A KEDA TriggerAuthentication reads a password key the rendered Secret has."""
    assert ta["apiVersion"] == "keda.sh/v1alpha1"
    secrets = {s["metadata"]["name"]: s for s in by_kind(docs, "Secret")}
    refs = ta["spec"]["secretTargetRef"]
    assert refs
    for ref in refs:
        assert ref["parameter"] == "password"
        assert ref["key"] in secrets[ref["name"]]["data"], ref


CRD_CHECKS = {
    "ServiceMonitor": check_service_monitor,
    "ScaledObject": check_scaled_object,
    "TriggerAuthentication": check_trigger_authentication,
}


def test_crds_have_what_their_operators_need(release: Any) -> None:
    name, values, docs = release
    seen = {kind: by_kind(docs, kind) for kind in CRD_CHECKS}
    for kind, items in seen.items():
        for item in items:
            CRD_CHECKS[kind](item, docs)
    if name == "everything-on":
        assert len(seen["ServiceMonitor"]) == 4  # api, worker, celery-exporter, flower
        assert len(seen["ScaledObject"]) == 1
        assert len(seen["TriggerAuthentication"]) == 1  # for the in-chart Redis's password
    if name == "hpa-mode":
        assert seen["ScaledObject"] == []
        hpa = component(docs, "HorizontalPodAutoscaler", "worker")
        assert {m["type"] for m in hpa["spec"]["metrics"]} == {"External"}


def test_every_job_the_alert_rules_match_is_scraped_by_the_chart(render: RenderFn) -> None:
    """Each `job` an alert rule names is a scrape job of monitoring/prometheus.yml and the
    job label of one of the chart's ServiceMonitors (all four components on)."""
    from tests.deploy.conftest import EVERYTHING_ON

    rules = (MONITORING / "alerts" / "dspy-fleet.rules.yml").read_text()
    matched: set[str] = set()
    for op, value in re.findall(r'job(=~?)"([^"]+)"', rules):
        matched |= set(value.split("|")) if op == "=~" else {value}
    assert matched, "the rules match no job at all: the regex above is stale"
    docs = render(EVERYTHING_ON)
    labelled = {s["metadata"]["labels"].get("dspy-fleet.io/metrics-job")
                for s in by_kind(docs, "Service")}  # fmt: skip
    assert {sm["spec"]["jobLabel"] for sm in by_kind(docs, "ServiceMonitor")} == {
        "dspy-fleet.io/metrics-job"
    }
    assert matched <= PROMETHEUS_JOBS, matched - PROMETHEUS_JOBS
    assert matched <= labelled, matched - labelled


@pytest.mark.parametrize(
    ("kind", "breakage"),
    [
        ("ServiceMonitor", lambda d: d["spec"]["endpoints"][0].update(port="nope")),
        ("ServiceMonitor", lambda d: d["spec"].pop("jobLabel")),
        (
            "ServiceMonitor",
            lambda d: d["spec"]["selector"]["matchLabels"].pop("app.kubernetes.io/component"),
        ),
        ("ScaledObject", lambda d: d["spec"]["scaleTargetRef"].update(name="missing")),
        ("ScaledObject", lambda d: d["spec"]["triggers"][0]["metadata"].update(listLength=50)),
        ("ScaledObject", lambda d: d["spec"]["triggers"].pop()),
        ("ScaledObject", lambda d: d["spec"]["triggers"][0].pop("authenticationRef")),
        ("TriggerAuthentication", lambda d: d["spec"]["secretTargetRef"][0].update(key="nope")),
    ],
)
def test_crd_checks_catch_broken_manifests(render: RenderFn, kind: str, breakage: Any) -> None:
    """Control: each CRD check fails on a manifest broken the way a template bug would."""
    from tests.deploy.conftest import EVERYTHING_ON

    docs = render(EVERYTHING_ON)
    doc = copy.deepcopy(by_kind(docs, kind)[0])
    breakage(doc)
    with pytest.raises(AssertionError):
        CRD_CHECKS[kind](doc, docs)


# --- values.schema.json: one case per rule.


@pytest.mark.parametrize(
    ("values", "where"),
    [
        ({"env": "prod"}, "/env"),
        ({"logLevel": "verbose"}, "/logLevel"),
        ({"workr": {"replicaCount": 2}}, "additional properties 'workr'"),
        ({"api": {"replicas": 3}}, "additional properties 'replicas'"),
        ({"worker": {"pool": "processes"}}, "/worker/pool"),
        ({"worker": {"concurrency": 0}}, "/worker/concurrency"),
        ({"worker": {"queues": "interactive,urgent"}}, "/worker/queues"),
        ({"worker": {"softShutdownTimeout": -1}}, "/worker/softShutdownTimeout"),
        ({"worker": {"terminationGraceMarginSeconds": 0}}, "/worker/terminationGraceMarginSeconds"),
        ({"worker": {"autoscaling": {"mode": "cron"}}}, "/worker/autoscaling/mode"),
        ({"worker": {"autoscaling": {"keda": {"redisAddress": "redis://x"}}}}, "redisAddress"),
        ({"api": {"maxWaitSeconds": 61}}, "/api/maxWaitSeconds"),
        ({"api": {"service": {"port": 70000}}}, "/api/service/port"),
        ({"api": {"autoscaling": {"targetCPUUtilizationPercentage": 150}}}, "targetCPU"),
        ({"api": {"resources": {"limits": None}}}, "/api/resources"),
        ({"worker": {"resources": None}}, "/worker"),
        ({"podSecurityContext": {"runAsNonRoot": False}}, "/podSecurityContext/runAsNonRoot"),
        ({"containerSecurityContext": {"readOnlyRootFilesystem": False}}, "readOnlyRootFilesystem"),
        ({"containerSecurityContext": {"capabilities": {"drop": ["NET_RAW"]}}}, "capabilities"),
        ({"redis": {"image": "redis"}}, "/redis/image"),
        (
            {"celeryExporter": {"image": "danihodovic/celery-exporter:latest"}},
            "/celeryExporter/image",
        ),
        ({"secrets": {"redisUrl": "http://redis:6379"}}, "/secrets/redisUrl"),
        (
            {"secrets": {"providerApiKeys": {"openai-key": "x"}}},
            "invalid propertyName 'openai-key'",
        ),
        ({"fleetConfig": {"models": None}}, "/fleetConfig"),
        ({"fleetConfig": {"tenants": {"team-a": {"usd_per_month": -1}}}}, "/fleetConfig/tenants"),
        ({"fleetConfig": {"tenants": {"team-a": {"usd_a_month": 1}}}}, "/fleetConfig/tenants"),
        ({"serviceMonitor": {"interval": "often"}}, "/serviceMonitor/interval"),
        ({"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy"),
    ],
)
def test_schema_rejects_bad_values(chart: helm_python.Chart, values: dict, where: str) -> None:
    with pytest.raises(helm_python.HelmValuesError) as exc:
        chart.render(values, name="fleet", namespace=NAMESPACE, is_install=True)
    assert where in str(exc.value)


# --- validateValues: unsafe combinations fail the render with a message saying what to do.

PROD_OK = {
    "env": "production",
    "redis": {"enabled": False},
    "mockLlm": {"enabled": False},
    "secrets": {"redisUrl": "redis://redis.internal:6379/0", "apiKeys": "tenant-a:hash"},
}


def test_safe_production_values_render(render: RenderFn) -> None:
    """The baseline the cases below each break in one way."""
    assert component(render(PROD_OK), "Deployment", "api")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"secrets": {"apiKeys": ""}}, "env=production needs API keys"),
        ({"redis": {"enabled": True}}, "the in-chart Redis is a single pod for trials"),
        ({"mockLlm": {"enabled": True}}, "mockLlm.enabled=false"),
        ({"flower": {"enabled": True}}, "flower.basicAuthSecret"),
        ({"secrets": {"redisUrl": ""}}, "redis.enabled=false needs secrets.redisUrl"),
        ({"timeLimit": 100}, "timeLimit must be greater than softTimeLimit"),
        ({"networkPolicy": {"enabled": False}}, "networkPolicy.acknowledgeDisabled=true"),
        ({"serviceMonitor": {"enabled": True}}, "needs networkPolicy.metricsFrom"),
        ({"api": {"resources": {"requests": {"cpu": None}}}}, "needs api.resources.requests.cpu"),
        (
            {"api": {"autoscaling": {"minReplicas": 5, "maxReplicas": 3}}},
            "api.autoscaling.minReplicas",
        ),
        (
            {"worker": {"autoscaling": {"enabled": True, "minReplicas": 9, "maxReplicas": 3}}},
            "worker.autoscaling.minReplicas",
        ),
        ({"worker": {"autoscaling": {"enabled": True, "mode": "keda"}}}, "keda.redisAddress"),
        ({"sentinel": {"enabled": True}}, "needs sentinel.hosts"),
        (
            {"sentinel": {"enabled": True, "hosts": ["s:26379"]}, "flower": {"enabled": True}},
            "not wired to Sentinel",
        ),
        (
            {
                "worker": {"autoscaling": {"enabled": True, "mode": "hpa"}},
                "celeryExporter": {"enabled": False},
            },
            "celeryExporter.enabled=true",
        ),
    ],
)
def test_validate_values_refuses_unsafe_combinations(
    chart: helm_python.Chart, change: dict, message: str
) -> None:
    with pytest.raises(helm_python.HelmRenderError) as exc:
        chart.render(
            deep_merge(PROD_OK, change), name="fleet", namespace=NAMESPACE, is_install=True
        )
    assert "VALUES VALIDATION" in str(exc.value)
    assert message in str(exc.value)


SENTINEL = {
    "sentinel": {"enabled": True, "hosts": ["s1:26379", "s2:26380", "s3"], "masterName": "m"},
    "secrets": {"redisUrl": "", "redisPassword": "data%40pw-1234", "sentinelPassword": "s-pw-5678"},
    # Not wired to Sentinel in this chart (validateValues says so).
    "flower": {"enabled": False},
    "celeryExporter": {"enabled": False},
}


def test_an_external_sentinel_reaches_every_pod_with_its_passwords_apart(
    render: RenderFn,
) -> None:
    docs = render(deep_merge(PROD_OK, SENTINEL))
    for name in ("api", "worker"):
        pod = component(docs, "Deployment", name)["spec"]["template"]["spec"]
        env = {e["name"]: e for e in pod["containers"][0]["env"]}
        names = [e["name"] for e in pod["containers"][0]["env"]]
        # The data nodes' password is expanded into the URL, so it is defined before it.
        assert names.index("REDIS_DATA_PASSWORD") < names.index("DSPY_FLEET_REDIS_URL")
        assert env["DSPY_FLEET_REDIS_URL"]["value"] == (
            "redis+sentinel://:$(REDIS_DATA_PASSWORD)@s1:26379,s2:26380,s3/m/0"
        )
        assert env["REDIS_DATA_PASSWORD"]["valueFrom"]["secretKeyRef"]["key"] == "redis-password"
        sentinel_ref = env["DSPY_FLEET_SENTINEL_PASSWORD"]["valueFrom"]["secretKeyRef"]
        assert sentinel_ref["key"] == "sentinel-password"
    api = component(docs, "Deployment", "api")["spec"]["template"]["spec"]["containers"][0]
    api_env = {e["name"]: e.get("value") for e in api["env"]}
    assert api_env["DSPY_FLEET_ACCEPT_MIN_REPLICAS"] == "1"
    (secret,) = [d for d in by_kind(docs, "Secret") if "sentinel-password" in d.get("data", {})]
    assert set(secret["data"]) >= {"redis-password", "sentinel-password"}
    # The network policies let the pods reach every Sentinel's port.
    policy = component(docs, "NetworkPolicy", "api")
    ports = {p["port"] for rule in policy["spec"]["egress"] for p in rule.get("ports", [])}
    assert {26379, 26380} <= ports
    # Valid manifests, and no password on a command line nor as a literal env value (the
    # URL names $(REDIS_DATA_PASSWORD), which the kubelet expands into the process's env).
    for doc in docs:
        with contextlib.suppress(kv.SchemaNotFoundError):
            kv.validate(doc, KUBE_VERSION, strict=True)
    check_no_secret_on_command_lines(docs)


def test_network_policies_off_in_production_only_when_acknowledged(render: RenderFn) -> None:
    values = deep_merge(PROD_OK, {"networkPolicy": {"enabled": False, "acknowledgeDisabled": True}})
    assert by_kind(render(values), "NetworkPolicy") == []


def test_existing_secret_counts_as_api_keys(render: RenderFn) -> None:
    values = deep_merge(
        PROD_OK, {"secrets": {"apiKeys": "", "redisUrl": "", "existingSecret": "s"}}
    )
    api = component(render(values), "Deployment", "api")
    env = {e["name"]: e for e in api["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["DSPY_FLEET_API_KEYS"]["valueFrom"]["secretKeyRef"]["name"] == "s"


# --- rolling on config change, and the worker's shutdown window.


def checksums(docs: list[Manifest]) -> dict[str, str]:
    """checksum/config of the api and worker pod templates."""
    return {
        name: component(docs, "Deployment", name)["spec"]["template"]["metadata"]["annotations"][
            "checksum/config"
        ]
        for name in ("api", "worker")
    }


def test_config_change_rolls_api_and_worker_pods(render: RenderFn) -> None:
    before = checksums(render(None))
    config = copy.deepcopy(yaml.safe_load((CHART_DIR / "values.yaml").read_text())["fleetConfig"])
    config["models"]["mock"]["timeout"] = 45
    after = checksums(render({"fleetConfig": config}))
    assert before["api"] != after["api"] and before["worker"] != after["worker"]
    # Values outside the ConfigMap leave the checksum alone.
    assert checksums(render({"api": {"threads": 8}})) == before
    # ...and the checksum is the ConfigMap's: same config, same checksum.
    assert checksums(render({"fleetConfig": config})) == after


def test_tenant_quotas_reach_the_config_the_pods_load(render: RenderFn, tmp_path: Any) -> None:
    """fleetConfig.tenants is rendered into the ConfigMap and loads as the fleet's quotas."""
    from dspy_fleet.fleet_config import load_fleet_config

    tenants = {"team-a": {"requests_per_day": 1000, "tokens_per_day": 2000000,
                          "usd_per_month": 0.5}}  # fmt: skip
    config = copy.deepcopy(yaml.safe_load((CHART_DIR / "values.yaml").read_text())["fleetConfig"])
    docs = render({"fleetConfig": {**config, "tenants": tenants}})
    rendered = by_kind(docs, "ConfigMap")[0]["data"]["fleet.yaml"]
    (tmp_path / "fleet.yaml").write_text(rendered)
    loaded = load_fleet_config(tmp_path / "fleet.yaml")
    assert loaded.tenants["team-a"].model_dump() == tenants["team-a"]


@pytest.mark.parametrize(("soft", "margin"), [(30, 15), (0, 5), (300, 30)])
def test_worker_grace_period_covers_soft_shutdown(render: RenderFn, soft: int, margin: int) -> None:
    docs = render(
        {"worker": {"softShutdownTimeout": soft, "terminationGraceMarginSeconds": margin}}
    )
    pod = component(docs, "Deployment", "worker")["spec"]["template"]["spec"]
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert float(env["DSPY_FLEET_SOFT_SHUTDOWN_TIMEOUT"]) == soft
    assert pod["terminationGracePeriodSeconds"] == soft + margin


def test_worker_grace_period_in_every_release(release: Any) -> None:
    _, _, docs = release
    pod = component(docs, "Deployment", "worker")["spec"]["template"]["spec"]
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert (
        pod["terminationGracePeriodSeconds"] >= float(env["DSPY_FLEET_SOFT_SHUTDOWN_TIMEOUT"]) + 5
    )


def test_every_value_is_documented() -> None:
    """Bitnami style: each leaf of values.yaml (or its parent map) has a `## @param` line."""
    text = (CHART_DIR / "values.yaml").read_text()
    documented = set(re.findall(r"^## @param (\S+)", text, re.M))

    def leaves(node: Any, prefix: str = "") -> list[str]:
        if isinstance(node, dict) and node and prefix.rstrip(".") not in documented:
            return [leaf for k, v in node.items() for leaf in leaves(v, f"{prefix}{k}.")]
        return [prefix.rstrip(".")]

    missing = [p for p in leaves(yaml.safe_load(text)) if p not in documented]
    assert missing == []
    # and no stale docs for values that no longer exist
    values = yaml.safe_load(text)
    for path in documented:
        node = values
        for part in path.split("."):
            assert isinstance(node, dict) and part in node, f"@param {path} has no value"
            node = node[part]
