"""The chart makes the trust boundaries of README "Security model" true (issue 21, item 7).

Every pod gets ingress and egress policies; metrics ports and Flower are closed to everyone
the operator did not name; no secret rides on a command line; the trial Redis requires a
password and every Redis URL a pod gets comes from a Secret.
"""

from __future__ import annotations

import base64
import copy
import re
from typing import Any

import helm_python
import pytest
import yaml

from tests.deploy.conftest import (
    CHART_DIR,
    EVERYTHING_ON,
    NAMESPACE,
    PRODUCTION_VALUES,
    Manifest,
    RenderFn,
    by_kind,
    component,
    pod_specs,
)

# Ports that must never be open to every source: metrics and Flower (payloads of every tenant).
CLOSED_PORTS = {"worker": "metricsPort", "celery-exporter": 9808, "flower": 5555}
PROVIDER_PORT = 443


def policies_for(labels: dict[str, str], docs: list[Manifest]) -> list[Manifest]:
    """The NetworkPolicies whose podSelector selects a pod with these labels."""
    out = []
    for np in by_kind(docs, "NetworkPolicy"):
        sel = np["spec"]["podSelector"]
        assert not sel.get("matchExpressions"), "podSelector by expressions: extend this check"
        if sel.get("matchLabels", {}).items() <= labels.items():
            out.append(np)
    return out


def rule_ports(rule: Manifest) -> set[Any]:
    """The ports a rule opens; {'*'} when it names none (every port)."""
    return {p["port"] for p in rule.get("ports", [])} or {"*"}


def matches_everyone(peer: Manifest) -> bool:
    """A peer that admits every source: all namespaces, or the whole address space."""
    if "ipBlock" in peer:
        return peer["ipBlock"]["cidr"] in ("0.0.0.0/0", "::/0") and not peer["ipBlock"].get(
            "except"
        )
    ns = peer.get("namespaceSelector")
    return ns is not None and not ns and not peer.get("podSelector")


def check_policies(docs: list[Manifest], values: dict[str, Any]) -> None:
    """Every pod is covered for ingress and egress; only the API port is open to all."""
    metrics_port = (values.get("worker") or {}).get("metricsPort", 9101)
    for name, meta, _ in pod_specs(docs):
        comp = meta["labels"]["app.kubernetes.io/component"]
        nps = policies_for(meta["labels"], docs)
        types = {t for np in nps for t in np["spec"]["policyTypes"]}
        assert {"Ingress", "Egress"} <= types, f"{name}: policies {types}"
        for np in nps:
            for rule in np["spec"].get("ingress") or []:
                peers = rule.get("from") or []
                open_to_all = not peers or any(matches_everyone(p) for p in peers)
                ports = rule_ports(rule)
                closed = CLOSED_PORTS.get(comp)
                closed = metrics_port if closed == "metricsPort" else closed
                assert not (open_to_all and (closed in ports or "*" in ports)), (
                    f"{name}: port {closed} open to every source"
                )
                if open_to_all:
                    assert comp == "api" and ports == {8080}, f"{name}: {rule} open to all"
            for rule in np["spec"].get("egress") or []:
                ports = rule_ports(rule)
                assert "*" not in ports, f"{name}: egress on every port: {rule}"
                if comp != "worker":
                    # Only workers call LLM providers.
                    assert PROVIDER_PORT not in ports or rule.get("to"), f"{name}: {rule}"
                    assert not any(matches_everyone(p) for p in rule.get("to", [])), name


def test_every_pod_has_ingress_and_egress_policies(release: Any) -> None:
    name, values, docs = release
    assert by_kind(docs, "NetworkPolicy"), name
    check_policies(docs, values)


def test_workers_alone_reach_providers_and_not_private_ranges(release: Any) -> None:
    _, _, docs = release
    worker = component(docs, "NetworkPolicy", "worker")
    out = [r for r in worker["spec"]["egress"] if PROVIDER_PORT in rule_ports(r)]
    assert len(out) == 1
    blocks = [p["ipBlock"] for p in out[0]["to"]]
    assert blocks and all("169.254.0.0/16" in b.get("except", []) for b in blocks)
    assert all("10.0.0.0/8" in b.get("except", []) for b in blocks)


def test_redis_accepts_only_the_fleet_pods(render: RenderFn) -> None:
    docs = render(EVERYTHING_ON)
    redis = component(docs, "NetworkPolicy", "redis")
    assert redis["spec"]["egress"] == []
    (rule,) = redis["spec"]["ingress"]
    assert rule_ports(rule) == {6379}
    fleet, keda = rule["from"]
    comps = fleet["podSelector"]["matchExpressions"][0]
    assert comps["key"] == "app.kubernetes.io/component"
    assert set(comps["values"]) == {"api", "worker", "flower", "celery-exporter"}
    # KEDA mode with the in-chart Redis: the operator's namespace may read the queue lengths.
    assert keda["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"] == "keda"


def test_named_peers_open_metrics_and_flower(render: RenderFn) -> None:
    docs = render(EVERYTHING_ON)
    prometheus = EVERYTHING_ON["networkPolicy"]["metricsFrom"]
    worker = component(docs, "NetworkPolicy", "worker")["spec"]["ingress"]
    assert worker == [{"ports": [{"port": 9101, "protocol": "TCP"}], "from": prometheus}]
    flower = component(docs, "NetworkPolicy", "flower")["spec"]["ingress"]
    assert flower[0]["from"] == EVERYTHING_ON["networkPolicy"]["flowerFrom"] + prometheus


def test_defaults_close_metrics_and_flower_to_everyone(render: RenderFn) -> None:
    docs = render({"flower": {"enabled": True}})
    for comp in ("worker", "celery-exporter", "flower"):
        assert component(docs, "NetworkPolicy", comp)["spec"]["ingress"] == [], comp


@pytest.mark.parametrize(
    "breakage",
    [
        # a metrics port open to every source
        lambda d: component(d, "NetworkPolicy", "worker")["spec"].update(
            ingress=[{"ports": [{"port": 9101}]}]
        ),
        # Flower open to every namespace
        lambda d: component(d, "NetworkPolicy", "flower")["spec"].update(
            ingress=[{"ports": [{"port": 5555}], "from": [{"namespaceSelector": {}}]}]
        ),
        # a pod without an egress policy
        lambda d: component(d, "NetworkPolicy", "celery-exporter")["spec"].update(
            policyTypes=["Ingress"]
        ),
        # egress on every port
        lambda d: component(d, "NetworkPolicy", "api")["spec"]["egress"].append({}),
        # the API going out to the internet on 443
        lambda d: component(d, "NetworkPolicy", "api")["spec"]["egress"].append(
            {"ports": [{"port": 443}]}
        ),
        # a pod no policy selects
        lambda d: d.remove(component(d, "NetworkPolicy", "mock-llm")),
    ],
)
def test_the_policy_check_catches_each_hole(render: RenderFn, breakage: Any) -> None:
    """Control: each way of opening a hole fails check_policies."""
    docs = copy.deepcopy(render({"flower": {"enabled": True}}))
    check_policies(docs, {})
    breakage(docs)
    with pytest.raises(AssertionError):
        check_policies(docs, {})


# --- no secret on a command line; every Redis URL from a Secret.

# URL userinfo (user:password@ or token@), and words that name a secret.
SECRET_PATTERNS = [
    re.compile(r"[a-z][a-z0-9+.-]*://[^/\s@]+@", re.I),
    re.compile(r"password|passwd|secret|token|requirepass", re.I),
    re.compile(r"key=", re.I),
    re.compile(r"(?<![a-z])auth=", re.I),
]


def secret_literals(docs: list[Manifest]) -> set[str]:
    """Every value of every rendered Secret, and each long token inside one.

    Values shorter than 6 characters (test fixtures such as apiKeys "k") would match
    everywhere and prove nothing, so they are left out.
    """
    out = set()
    for s in by_kind(docs, "Secret"):
        for raw in (s.get("data") or {}).values():
            value = base64.b64decode(raw).decode()
            out.add(value.strip())
            out.update(t for t in re.split(r"[\s:@/]+", value) if len(t) >= 8)
    return {v for v in out if len(v) >= 6}


def check_no_secret_on_command_lines(docs: list[Manifest]) -> None:
    """No container's command or args carries a secret, literally or via $(VAR) expansion."""
    literals = secret_literals(docs)
    for name, _, spec in pod_specs(docs):
        for c in spec.get("initContainers", []) + spec["containers"]:
            where = f"{name}/{c['name']}"
            from_secret = {
                e["name"] for e in c.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})
            }
            for arg in (c.get("command") or []) + (c.get("args") or []):
                arg = str(arg)
                for pattern in SECRET_PATTERNS:
                    assert not pattern.search(arg), f"{where}: {arg!r} matches {pattern.pattern}"
                for literal in literals:
                    assert literal not in arg, f"{where}: a Secret's value in {arg!r}"
                # Kubernetes expands $(VAR) in command/args: a secret env var would land in argv.
                for var in re.findall(r"\$\((\w+)\)", arg):
                    assert var not in from_secret, f"{where}: $({var}) is a secret in {arg!r}"
            for env in c.get("env", []):
                value = str(env.get("value", ""))
                for literal in literals:
                    assert literal not in value, f"{where}: {env['name']} holds a Secret's value"


def check_redis_urls_from_secrets(docs: list[Manifest]) -> int:
    """Every env var carrying a Redis/broker URL reads it from a Secret; returns how many."""
    seen = 0
    for name, _, spec in pod_specs(docs):
        for c in spec["containers"]:
            env = {e["name"]: e for e in c.get("env", [])}
            for var, e in env.items():
                value = str(e.get("value", ""))
                if re.search(r"REDIS_URL|BROKER_URL", var) or value.startswith("redis"):
                    seen += 1
                    ref = re.fullmatch(r"\$\((\w+)\)", value)
                    source = env[ref.group(1)] if ref else e
                    assert "secretKeyRef" in source.get("valueFrom", {}), f"{name}: {var}={e}"
                    assert source["valueFrom"]["secretKeyRef"]["key"] == "redis-url"
    return seen


def test_no_secret_on_any_command_line(release: Any) -> None:
    _, _, docs = release
    check_no_secret_on_command_lines(docs)


def test_every_redis_url_comes_from_a_secret(release: Any) -> None:
    name, _, docs = release
    # api, worker, celery-exporter at least (Flower too when enabled).
    assert check_redis_urls_from_secrets(docs) >= 3, name


def test_celery_exporter_reads_the_broker_url_from_its_env(release: Any) -> None:
    _, _, docs = release
    pod = component(docs, "Deployment", "celery-exporter")["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert not any("broker" in a for a in c["args"]), c["args"]
    env = {e["name"]: e for e in c["env"]}
    assert env["CE_BROKER_URL"]["valueFrom"]["secretKeyRef"]["key"] == "redis-url"


@pytest.mark.parametrize(
    "breakage",
    [
        # the exporter as it was: the URL expanded into its arguments
        lambda c: c["args"].insert(0, "--broker-url=$(CE_BROKER_URL)"),
        lambda c: c["args"].append("--broker-url=redis://:hunter2hunter2@redis:6379/0"),
        lambda c: c["args"].append("--api-key=abc"),
        lambda c: c["env"].append({"name": "CE_BROKER_URL_X", "value": "redis://redis:6379/0"}),
    ],
)
def test_the_command_line_check_catches_each_leak(render: RenderFn, breakage: Any) -> None:
    """Control: a secret on a command line, or a plain Redis URL, fails the checks."""
    docs = copy.deepcopy(render(None))
    c = component(docs, "Deployment", "celery-exporter")["spec"]["template"]["spec"]
    breakage(c["containers"][0])
    with pytest.raises(AssertionError):
        check_no_secret_on_command_lines(docs)
        check_redis_urls_from_secrets(docs)


def test_a_secret_value_on_a_command_line_is_caught(render: RenderFn) -> None:
    """Control: the literal value of the Redis Secret in any argument fails the check."""
    docs = copy.deepcopy(render(None))
    secret = component(docs, "Secret", "redis")
    password = base64.b64decode(secret["data"]["redis-password"]).decode()
    mock = component(docs, "Deployment", "mock-llm")["spec"]["template"]["spec"]["containers"][0]
    mock["args"].append(password)
    with pytest.raises(AssertionError, match="a Secret's value"):
        check_no_secret_on_command_lines(docs)


# --- the trial Redis requires a password.


def decoded(secret: Manifest) -> dict[str, str]:
    """A Secret's data, decoded."""
    return {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}


@pytest.mark.parametrize("given", ["", "correct-horse-battery-staple"])
def test_trial_redis_requires_a_password(render: RenderFn, given: str) -> None:
    docs = render({"redis": {"auth": {"password": given}}})
    data = decoded(component(docs, "Secret", "redis"))
    password = data["redis-password"]
    assert password == given if given else re.fullmatch(r"[A-Za-z0-9]{32}", password)
    host = component(docs, "Service", "redis")["metadata"]["name"]
    assert data["redis-url"] == f"redis://:{password}@{host}:6379/0"
    assert data["redis-auth.conf"] == f"requirepass {password}\n"
    sts = component(docs, "StatefulSet", "redis")["spec"]["template"]["spec"]
    (c,) = sts["containers"]
    # redis-server's first argument is the mounted config file holding requirepass.
    assert c["args"][:2] == ["redis-server", "/etc/redis-auth/redis-auth.conf"]
    mount = next(m for m in c["volumeMounts"] if m["mountPath"] == "/etc/redis-auth")
    volume = next(v for v in sts["volumes"] if v["name"] == mount["name"])
    assert volume["secret"]["secretName"] == component(docs, "Secret", "redis")["metadata"]["name"]
    assert volume["secret"]["items"] == [{"key": "redis-auth.conf", "path": "redis-auth.conf"}]
    # The probes' redis-cli authenticates from the Secret too.
    env = {e["name"]: e for e in c["env"]}
    assert env["REDISCLI_AUTH"]["valueFrom"]["secretKeyRef"]["key"] == "redis-password"
    # Every pod's URL is that Secret's.
    for comp in ("api", "worker"):
        pod = component(docs, "Deployment", comp)["spec"]["template"]["spec"]
        env = {e["name"]: e for e in pod["containers"][0]["env"]}
        ref = env["DSPY_FLEET_REDIS_URL"]["valueFrom"]["secretKeyRef"]
        secret = component(docs, "Secret", "redis")["metadata"]["name"]
        assert ref == {"name": secret, "key": "redis-url"}


def test_production_example_keeps_redis_urls_in_its_existing_secret(
    render: RenderFn, production_values: dict
) -> None:
    docs = render(production_values)
    for comp in ("api", "worker", "celery-exporter", "flower"):
        pod = component(docs, "Deployment", comp)["spec"]["template"]["spec"]
        refs = [
            ref
            for e in pod["containers"][0]["env"]
            if (ref := e.get("valueFrom", {}).get("secretKeyRef")) and ref["key"] == "redis-url"
        ]
        assert refs == [{"name": "dspy-fleet-secrets", "key": "redis-url"}], comp
    # The production example restricts the API port too, and names Redis's address range.
    api = component(docs, "NetworkPolicy", "api")["spec"]
    assert all(r.get("from") for r in api["ingress"])
    redis_rule = next(r for r in api["egress"] if rule_ports(r) == {6380})
    assert redis_rule["to"][0]["ipBlock"]["cidr"]


@pytest.mark.parametrize(
    ("values", "where"),
    [
        ({"redis": {"auth": {"password": "short"}}}, "/redis/auth/password"),
        ({"redis": {"auth": {"password": "has spaces in it, sixteen+"}}}, "/redis/auth/password"),
        ({"networkPolicy": {"metricsFrom": [{}]}}, "/networkPolicy/metricsFrom"),
        ({"networkPolicy": {"egress": {"providersPorts": [0]}}}, "providersPorts"),
        ({"networkPolicy": {"egres": {}}}, "additional properties 'egres'"),
    ],
)
def test_schema_rejects_bad_security_values(
    chart: helm_python.Chart, values: dict, where: str
) -> None:
    with pytest.raises(helm_python.HelmValuesError) as exc:
        chart.render(values, name="fleet", namespace=NAMESPACE, is_install=True)
    assert where in str(exc.value)


class _UniqueKeyLoader(yaml.SafeLoader):
    """A YAML loader that refuses a key given twice (PyYAML and Helm keep the last silently)."""

    def construct_mapping(self, node: Any, deep: bool = False) -> dict[Any, Any]:
        keys = [self.construct_object(k, deep=deep) for k, _ in node.value]
        dupes = {k for k in keys if keys.count(k) > 1}
        assert not dupes, f"line {node.start_mark.line + 1}: {sorted(dupes)} given twice"
        return super().construct_mapping(node, deep=deep)


@pytest.mark.parametrize("path", [CHART_DIR / "values.yaml", PRODUCTION_VALUES], ids=str)
def test_values_files_give_each_key_once(path: Any) -> None:
    """A second `networkPolicy:` block would silently drop the first one's peers."""
    yaml.load(path.read_text(), Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
