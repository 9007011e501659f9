"""docker-compose.yml: valid per the compose spec, healthy start order, every reference resolves."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import click
import pytest
import yaml

from dspy_fleet.cli.main import main as cli
from tests.deploy.conftest import ROOT, tool
from tests.deploy.test_pods import KNOWN_ENV

COMPOSE = ROOT / "docker-compose.yml"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    """The compose file, anchors and merge keys resolved."""
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    """Its services by name."""
    return compose["services"]


def test_compose_file_matches_the_compose_spec() -> None:
    result = subprocess.run(
        [tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(COMPOSE)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_spec_check_can_fail(tmp_path: Path) -> None:
    """Control: a misspelt key is rejected by the same command."""
    bad = tmp_path / "docker-compose.yml"
    bad.write_text(COMPOSE.read_text().replace("healthcheck:", "healthchek:", 1))
    result = subprocess.run(
        [tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(bad)],
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0


def test_the_stack_has_every_service(services: dict[str, Any]) -> None:
    assert set(services) == {
        "redis", "api", "worker", "flower", "celery-exporter", "prometheus", "grafana", "mock-llm"
    }  # fmt: skip
    assert services["celery-exporter"]["image"].startswith("danihodovic/celery-exporter:")
    redis = services["redis"]
    assert "--appendonly" in redis["command"] and "yes" in redis["command"]
    assert any(v.endswith(":/data") for v in redis["volumes"])


def test_every_service_is_health_checked_and_waits_on_health(services: dict[str, Any]) -> None:
    for name, svc in services.items():
        assert svc["healthcheck"]["test"][0] == "CMD", name
        for dep, cond in svc.get("depends_on", {}).items():
            assert dep in services, f"{name} depends on unknown {dep}"
            assert cond == {"condition": "service_healthy"}, f"{name} -> {dep}"
    for name in ("api", "worker", "flower", "celery-exporter", "prometheus", "grafana"):
        assert services[name].get("depends_on"), f"{name} starts without waiting"


def test_images_are_pinned(services: dict[str, Any]) -> None:
    for name, svc in services.items():
        image = svc["image"]
        tag = image.rsplit("/", 1)[-1].partition(":")[2]
        assert tag and tag != "latest", f"{name}: {image}"
        if "build" not in svc:
            assert re.search(r"\d", tag), f"{name}: {image} is not a version"


def test_build_contexts_and_dockerfiles_exist(services: dict[str, Any]) -> None:
    built = {name: svc["build"] for name, svc in services.items() if "build" in svc}
    assert set(built) == {"api", "worker", "mock-llm"}
    for name, build in built.items():
        context = ROOT / build["context"]
        assert (context / build["dockerfile"]).is_file(), name
        # One image per Dockerfile: the tag must say which one.
        assert build["dockerfile"].split(".")[-1] in services[name]["image"] or name == "mock-llm"


def test_bind_mounts_exist_in_the_repo(services: dict[str, Any]) -> None:
    """monitoring/ comes from the observability work; these fail until it is there."""
    missing = []
    for name, svc in services.items():
        for vol in svc.get("volumes", []):
            source = vol.split(":", 1)[0]
            if source.startswith(".") and not (ROOT / source).exists():
                missing.append(f"{name}: {source}")
    assert missing == []


def test_prometheus_rules_and_grafana_provisioning_match_the_mounts(
    services: dict[str, Any],
) -> None:
    prom_file = ROOT / "monitoring" / "prometheus.yml"
    assert prom_file.is_file(), "monitoring/prometheus.yml missing (observability work)"
    prom = yaml.safe_load(prom_file.read_text())
    rule_files = prom.get("rule_files", [])
    assert rule_files, "prometheus.yml loads no rules"
    mounted = {v.split(":")[1] for v in services["prometheus"]["volumes"]}
    for pattern in rule_files:
        full = pattern if pattern.startswith("/") else f"/etc/prometheus/{pattern}"
        assert any(full.startswith(m + "/") for m in mounted), f"rule file {pattern} not mounted"
    assert list((ROOT / "monitoring" / "alerts").glob("*.rules.yml")), "no alert rules"
    # Scrape targets are compose services on ports they listen on.
    ports = {"api": 8080, "worker": 9101, "celery-exporter": 9808, "flower": 5555,
             "prometheus": 9090, "mock-llm": 8900, "redis": 6379, "grafana": 3000}  # fmt: skip
    for job in prom["scrape_configs"]:
        for static in job.get("static_configs", []):
            for target in static["targets"]:
                host, _, port = target.partition(":")
                if host == "localhost" and job["job_name"] == "prometheus":
                    host = "prometheus"  # Prometheus scraping itself, inside its container
                assert host in services, f"{job['job_name']}: {target} is no compose service"
                assert int(port) == ports[host], f"{job['job_name']}: {target}"
    grafana_mounts = {v.split(":")[1]: v.split(":")[0] for v in services["grafana"]["volumes"]}
    providers = ROOT / "monitoring" / "grafana" / "provisioning" / "dashboards"
    for f in providers.glob("*.y*ml"):
        for p in yaml.safe_load(f.read_text()).get("providers", []):
            path = p["options"]["path"]
            assert path in grafana_mounts, f"dashboards provider path {path} is not mounted"
    sources = ROOT / "monitoring" / "grafana" / "provisioning" / "datasources"
    urls = [
        ds["url"]
        for f in sources.glob("*.y*ml")
        for ds in yaml.safe_load(f.read_text()).get("datasources", [])
    ]
    assert urls, "no Grafana datasource"
    for url in urls:
        assert urlparse(url).hostname in services, url


def test_commands_exist_in_the_cli(services: dict[str, Any]) -> None:
    ctx = click.Context(cli)
    for name, svc in services.items():
        command = svc.get("command")
        if not command or command[0] != "dspy-fleet":
            continue
        sub = cli.get_command(ctx, command[1])
        assert sub is not None, f"{name}: dspy-fleet {command[1]} does not exist"
        options = {opt for p in sub.params for opt in getattr(p, "opts", [])}
        for arg in command[2:]:
            if arg.startswith("--"):
                assert arg.split("=")[0] in options, f"{name}: {command[1]} has no {arg}"


def test_environment_names_are_real_settings(services: dict[str, Any]) -> None:
    for name, svc in services.items():
        for var in svc.get("environment", {}):
            if var.startswith("DSPY_FLEET_"):
                assert var in KNOWN_ENV, f"{name}: {var} is not a setting"
        env = svc.get("environment", {})
        if "DSPY_FLEET_REDIS_URL" in env:
            assert urlparse(env["DSPY_FLEET_REDIS_URL"]).hostname == "redis"


def test_containers_listen_where_they_are_reached(services: dict[str, Any]) -> None:
    assert services["api"]["environment"]["DSPY_FLEET_API_HOST"] == "0.0.0.0"
    # Prometheus scrapes worker:9101 from its container; the setting's default is loopback.
    assert services["worker"]["environment"]["DSPY_FLEET_METRICS_HOST"] == "0.0.0.0"
    mock_url = urlparse(services["worker"]["environment"]["DSPY_FLEET_MOCK_LLM_URL"])
    assert mock_url.hostname == "mock-llm"
    mock_cmd = services["mock-llm"]["command"]
    assert mock_cmd[mock_cmd.index("--host") + 1] == "0.0.0.0"
    assert mock_cmd[mock_cmd.index("--port") + 1] == str(mock_url.port)


def seconds(duration: str) -> int:
    """Compose duration like 45s or 1m30s."""
    parts = re.fullmatch(r"(?:(\d+)m)?(?:(\d+)s)?", duration)
    assert parts, duration
    return int(parts[1] or 0) * 60 + int(parts[2] or 0)


def test_stop_grace_covers_the_drain(services: dict[str, Any]) -> None:
    worker = services["worker"]
    soft = float(worker["environment"]["DSPY_FLEET_SOFT_SHUTDOWN_TIMEOUT"])
    assert seconds(worker["stop_grace_period"]) >= soft + 5
    # gunicorn drains for max_wait_seconds (60 by default) + 5.
    assert seconds(services["api"]["stop_grace_period"]) >= 65 + 5
    for name in ("api", "worker"):
        assert services[name]["stop_signal"] == "SIGTERM"
        assert services[name]["read_only"] is True
        assert services[name]["cap_drop"] == ["ALL"]
