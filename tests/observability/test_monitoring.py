"""monitoring/: Prometheus config, alert rules and their unit tests, Grafana provisioning
and dashboard, checked with promtool and against what the running stack exports."""

from __future__ import annotations

import json
import re
import subprocess
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from dspy_fleet.broker.celery_config import make_celery
from dspy_fleet.contract import TASK_NAME
from dspy_fleet.devtools.redis import RedisServer
from dspy_fleet.settings import CommonSettings
from tests.conftest import Service, poll
from tests.observability.conftest import ROOT, Tool, scrape, worker_metrics_url

MONITORING = ROOT / "monitoring"
RULES = sorted((MONITORING / "alerts").glob("*.rules.yml"))
RULE_TESTS = sorted((MONITORING / "alerts" / "tests").glob("*.yml"))
DASHBOARDS = sorted((MONITORING / "grafana" / "dashboards").glob("*.json"))

# The alert list: error rate, breaker open, backlog growing, no live workers,
# p95 latency over SLO, cost burn rate.
REQUIRED_ALERTS = {
    "DspyHighErrorRate",
    "DspyCircuitBreakerOpen",
    "DspyQueueBacklogGrowing",
    "DspyNoLiveWorkers",
    "DspyPredictionLatencyHigh",
    "DspyCostBurnRateHigh",
}
# SPEC §4: every family gets a panel.
SPEC_FAMILIES = {
    "dspy_predictions_total",
    "dspy_prediction_duration_seconds",
    "dspy_cache_operations_total",
    "dspy_circuit_breaker_state",
    "dspy_prediction_cost_total",
    "dspy_token_usage_total",
    "dspy_active_predictions",
    "dspy_errors_total",
    "dspy_api_requests_total",
    "dspy_api_request_duration_seconds",
    "dspy_jobs_enqueued_total",
    "dspy_queue_length",
}
# Panels whose series exist only once something happened (a prediction, a cache lookup, a
# job enqueued, a Celery task): right after start-up they show their "no data" text
# (fieldConfig.defaults.noValue), and say so in their description. Every other panel has a
# value even then; under traffic all have (test_live_prometheus.py checks both).
IDLE_NO_DATA = {2, 3, 4, 5, 6, 9, 10, 11, 12, 13, 17, 23, 24, 27, 28, 30, 31, 32, 33}
# Series Prometheus makes itself (not exported by any process of the stack).
PROMETHEUS_SERIES = {"up"}
# Series that exist only once pacing has something to show: the gauges for a model with a
# rate limit (configured, or learned from a 429), the counter once a job was throttled. The
# default config limits no model, so the stack below has none of them.
# test_api_metrics.py checks the API exports the gauges and test_live_prometheus.py (whose
# config sets an rpm) the rate panel under traffic; the throttled panel falls back to 0
# per model served. No test scrapes the workers' counter (worker/metrics.py) yet.
PACING_SERIES = {
    "dspy_rate_limit_effective_rpm",
    "dspy_rate_limit_configured_rpm",
    "dspy_rate_limit_throttled_total",
}
# Units a panel may use, and what its title says it shows.
UNITS_BY_TITLE = [
    ("ratio", {"percentunit"}),
    ("USD", {"currencyUSD"}),
    ("latency", {"s"}),
    ("runtime", {"s"}),
    ("per second", {"reqps", "ops", "short"}),
]
UNITS = {"percentunit", "currencyUSD", "s", "reqps", "ops", "short"}
REPO_URL = "https://github.com/example/dspy-fleet"  # helm/dspy-fleet/Chart.yaml's home
# An alert's dashboard_url: a Grafana path, one panel, the alert's model when it has one.
DASHBOARD_URL = re.compile(
    r"/d/([\w-]+)/[\w-]+\?viewPanel=(\d+)(&var-model=\{\{ \$labels\.model \}\})?"
)
# What Grafana substitutes before a query reaches Prometheus.
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "15s",
    "$__range": "3h",
    "$model": ".*",
}
_PROMQL_WORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool",
    "and", "or", "unless", "offset", "inf", "nan",
}  # fmt: skip


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=ROOT)


def _alerts() -> list[dict[str, Any]]:
    return [
        rule
        for path in RULES
        for group in yaml.safe_load(path.read_text())["groups"]
        for rule in group["rules"]
        if "alert" in rule
    ]


def _panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))  # collapsed rows nest their panels
    return out


def legend_labels(legend: str) -> set[str]:
    """The labels a Grafana legend format names ("{{model}} {{type}}" -> {model, type})."""
    return set(re.findall(r"\{\{\s*(\w+)\s*\}\}", legend))


def kept_labels(expr: str) -> set[str] | None:
    """The labels an aggregated expression keeps (every ``by (...)`` clause); None when it
    does not aggregate (it keeps the series' own labels)."""
    clauses = re.findall(r"\bby\s*\(([^)]*)\)", expr)
    if not clauses:
        return None
    return {label.strip() for clause in clauses for label in clause.split(",") if label.strip()}


def github_anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    return re.sub(r"[^a-z0-9 _-]", "", heading.strip().lower()).replace(" ", "-")


def _queries() -> list[tuple[str, str]]:
    """(where, PromQL with Grafana's variables substituted) for every panel target."""
    out = []
    for path in DASHBOARDS:
        for panel in _panels(json.loads(path.read_text())):
            for target in panel.get("targets", []):
                expr = target["expr"]
                for var, value in GRAFANA_VARIABLES.items():
                    expr = expr.replace(var, value)
                out.append((f"{path.name} panel {panel['id']} {target['refId']}", expr))
    return out


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (not functions, labels or keywords)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # range selectors
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        word = match.group(0)
        following = text[match.end() :].lstrip()
        if following.startswith("(") or word.lower() in _PROMQL_WORDS:
            continue
        names.add(word)
    return names


def test_metric_names_are_extracted_from_promql() -> None:
    expr = (
        'sum by (le, model) (rate(dspy_x_bucket{model=~"a|b"}[5m])) / ignoring(le) '
        "sum(rate(dspy_y_total[5m])) * 3600 > bool 1 or on() vector(0)"
    )
    assert metric_names(expr) == {"dspy_x_bucket", "dspy_y_total"}


def test_prometheus_config_is_valid_and_scrapes_the_stack(promtool: str) -> None:
    result = _run([promtool, "check", "config", "monitoring/prometheus.yml"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(RULES)} rule files found" in result.stdout
    config = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    targets = set()
    for job in config["scrape_configs"]:
        for static in job.get("static_configs", []):
            targets.update(static["targets"])
        for dns in job.get("dns_sd_configs", []):
            targets.update(f"{name}:{dns['port']}" for name in dns["names"])
    assert {"api:8080", "worker:9101", "celery-exporter:9808", "flower:5555"} <= targets


def test_alert_rules_pass_promtool_and_their_unit_tests(promtool: str) -> None:
    assert RULES and RULE_TESTS
    check = _run([promtool, "check", "rules", *map(str, RULES)])
    assert check.returncode == 0, check.stdout + check.stderr
    test = _run([promtool, "test", "rules", *map(str, RULE_TESTS)])
    assert test.returncode == 0, test.stdout + test.stderr


def test_every_alert_is_documented_and_unit_tested() -> None:
    alerts = _alerts()
    names = [a["alert"] for a in alerts]
    assert len(names) == len(set(names)), "duplicate alert names"
    assert set(names) >= REQUIRED_ALERTS
    fired = {
        case["alertname"]
        for path in RULE_TESTS
        for group in yaml.safe_load(path.read_text())["tests"]
        for case in group.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    for alert in alerts:
        name = alert["alert"]
        assert alert["labels"]["severity"] in {"critical", "warning", "info"}, name
        assert alert["annotations"]["summary"].strip(), name
        assert alert["annotations"]["description"].strip(), name
        assert name in fired, f"{name} has no promtool test where it fires"


def test_every_alert_links_its_runbook_section_and_dashboard_panel() -> None:
    readme = (MONITORING / "README.md").read_text()
    anchors = {github_anchor(h) for h in re.findall(r"^#+ (.+)$", readme, re.M)}
    dashboards = {
        (d := json.loads(p.read_text()))["uid"]: {panel["id"] for panel in _panels(d)}
        for p in DASHBOARDS
    }
    for alert in _alerts():
        name, notes = alert["alert"], alert["annotations"]
        base, _, anchor = notes["runbook_url"].partition("#")
        assert base == f"{REPO_URL}/blob/main/monitoring/README.md", name
        assert anchor == name.lower() and anchor in anchors, f"{name}: no section {anchor}"
        match = DASHBOARD_URL.fullmatch(notes["dashboard_url"])
        assert match, f"{name}: {notes['dashboard_url']}"
        uid, panel = match.group(1), int(match.group(2))
        assert panel in dashboards.get(uid, set()), f"{name}: no panel {panel} in {uid}"
        if match.group(3):  # the model variable only for alerts that carry a model
            assert "by (model)" in alert["expr"], name


def test_every_dashboard_query_is_valid_promql(promtool: str, tmp_path: Path) -> None:
    queries = _queries()
    assert queries
    rules = [
        {"record": f"dashboard:query_{i}", "expr": expr} for i, (_, expr) in enumerate(queries)
    ]
    path = tmp_path / "dashboard-queries.rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = _run([promtool, "check", "rules", str(path)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout


def test_dashboards_have_unique_ids_and_cover_every_family() -> None:
    assert DASHBOARDS
    uids = [json.loads(p.read_text())["uid"] for p in DASHBOARDS]
    assert len(uids) == len(set(uids)) and all(uids)
    for path in DASHBOARDS:
        panels = _panels(json.loads(path.read_text()))
        ids = [p["id"] for p in panels]
        assert len(ids) == len(set(ids)), f"{path.name}: duplicate panel ids"
    used = {re.sub(r"_(bucket|count|sum)$", "", m) for _, e in _queries() for m in metric_names(e)}
    assert used >= SPEC_FAMILIES, SPEC_FAMILIES - used

    panels = _panels(json.loads((MONITORING / "grafana/dashboards/dspy-fleet.json").read_text()))
    by_title = {p["title"]: p for p in panels}
    cost = by_title["Cost per hour by model (USD)"]["targets"][0]["expr"]
    assert "by (model)" in cost and "dspy_prediction_cost_total" in cost and "3600" in cost
    depth = " ".join(t["expr"] for t in by_title["Queue depth"]["targets"])
    assert "dspy_queue_length" in depth and "celery_queue_length" in depth


def test_every_panel_has_a_unit_legends_and_says_what_no_data_means() -> None:
    for path in DASHBOARDS:
        for panel in _panels(json.loads(path.read_text())):
            if panel["type"] == "row":
                continue
            where = f"{path.name} panel {panel['id']} {panel['title']!r}"
            defaults = panel["fieldConfig"]["defaults"]
            unit = defaults.get("unit")
            assert unit in UNITS, f"{where}: unit {unit!r}"
            for word, units in UNITS_BY_TITLE:
                if re.search(rf"\b{word}\b", panel["title"], re.I):
                    assert unit in units, f"{where}: {unit} for a {word} panel"
            for target in panel["targets"]:
                legend = target.get("legendFormat", "")
                assert legend.strip(), f"{where} {target['refId']}: no legend"
                kept = kept_labels(target["expr"])
                if kept is not None:
                    assert legend_labels(legend) <= kept, f"{where}: legend {legend!r}"
            if panel["id"] in IDLE_NO_DATA:
                assert defaults.get("noValue"), f"{where}: may be empty, says nothing then"
                assert "No data:" in panel["description"], where


def test_grafana_provisioning_points_at_prometheus_and_the_dashboards() -> None:
    grafana = MONITORING / "grafana"
    sources = yaml.safe_load((grafana / "provisioning/datasources/prometheus.yml").read_text())
    (source,) = sources["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    providers = yaml.safe_load((grafana / "provisioning/dashboards/dspy-fleet.yml").read_text())
    assert providers["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    for path in DASHBOARDS:
        dashboard = json.loads(path.read_text())
        variables = {v["name"] for v in dashboard["templating"]["list"]}
        for panel in _panels(dashboard):
            if panel["type"] != "row":
                assert panel["datasource"]["uid"] in ("${datasource}", source["uid"])
                assert "datasource" in variables or panel["datasource"]["uid"] == source["uid"]


@pytest.fixture(scope="module")
def stack_samples(
    api: Service,
    worker: Service,
    celery_exporter: Tool,
    flower: Tool,
    redis_server: RedisServer,
) -> set[str]:
    """Sample names scraped from the api, a worker, celery-exporter and Flower after real
    traffic: a prediction that succeeds (and is given feedback) and a malformed message that
    fails."""
    exporter_metrics = celery_exporter.url + "/metrics"
    poll(lambda: any(n == "celery_worker_up" and v for n, _, v in scrape(exporter_metrics)), 30)
    api_client = httpx.Client(base_url=api.url, timeout=30)
    ok = api_client.post("/v1/predict", json={"input": "Dashboards: 1+2?", "wait": 20})
    assert ok.json()["status"] == "succeeded", ok.text
    producer = make_celery(CommonSettings(redis_url=redis_server.url))
    bad = str(uuid.uuid4())
    producer.send_task(TASK_NAME, kwargs={"job_id": bad}, task_id=bad, queue="batch")
    poll(lambda: api_client.get(f"/v1/predictions/{bad}").json().get("status") == "failed", 20)
    judged = api_client.post(f"/v1/predictions/{ok.json()['id']}/feedback", json={"score": 0.8})
    assert judged.status_code == 201, judged.text

    def celery_seen() -> bool:
        names = {n for n, _, _ in scrape(celery_exporter.url + "/metrics")}
        return {"celery_task_succeeded_total", "celery_task_failed_total"} <= names

    poll(celery_seen, timeout=20, interval=0.2)
    api_client.close()
    urls = [
        api.url + "/metrics",
        worker_metrics_url(worker) + "/metrics",
        celery_exporter.url + "/metrics",
        flower.url + "/metrics",
    ]
    return {name for url in urls for name, _, _ in scrape(url)}


def test_every_metric_a_panel_uses_is_exported_by_the_stack(stack_samples: set[str]) -> None:
    missing = {
        name: where
        for where, expr in _queries()
        for name in metric_names(expr)
        if name not in stack_samples and name not in PROMETHEUS_SERIES | PACING_SERIES
    }
    assert not missing, f"panels query metrics nobody exports: {missing}"


# Which kind of process exports which dspy_* family (README, Metrics): each family comes
# from one kind only, so no panel shows a second, always-idle instance of it.
API_FAMILIES = {
    "dspy_api_requests_total",
    "dspy_api_request_duration_seconds",
    "dspy_jobs_enqueued_total",
    "dspy_queue_length",
    "dspy_circuit_breaker_state",
    "dspy_cache_operations_total",  # the API's own L2 lookups (submit fast path)
    "dspy_api_limited_total",  # fair-share limits (api/limits.py, api/rate_limit.py)
    "dspy_api_waits_held",  # held `wait` requests (api/limits.py)
    "dspy_api_wait_wakeups_total",  # what woke them (api/waiter.py)
    "dspy_rate_limit_effective_rpm",  # the pacer's state in Redis, read at scrape time
    "dspy_rate_limit_configured_rpm",
    "dspy_feedback_total",  # feedback posted (api/routes/feedback.py)
    "dspy_feedback_score",
    "dspy_api_event_streams_open",  # open event streams (api/routes/events.py)
}
WORKER_FAMILIES = {
    "dspy_predictions_total",
    "dspy_prediction_duration_seconds",
    "dspy_cache_operations_total",
    "dspy_prediction_cost_total",
    "dspy_token_usage_total",
    "dspy_active_predictions",
    "dspy_errors_total",
    "dspy_traces_total",  # traces captured, by outcome (worker/traces.py)
}


def _families(url: str) -> set[str]:
    text = httpx.get(url, timeout=10).text
    return {name for name in re.findall(r"^# TYPE (\S+) ", text, re.M) if name.startswith("dspy_")}


def test_each_family_comes_from_one_kind_of_process(
    stack_samples: set[str], api: Service, worker: Service, flower: Tool
) -> None:
    api_families = _families(api.url + "/metrics")
    worker_families = _families(worker_metrics_url(worker) + "/metrics")
    # Flower imports the task modules (hence the worker's metrics module): none of it shows.
    assert _families(flower.url + "/metrics") == set()
    assert api_families <= API_FAMILIES, api_families - API_FAMILIES
    assert worker_families <= WORKER_FAMILIES, worker_families - WORKER_FAMILIES
    # The fleet's state (breakers, queues) from the API alone; work in flight from workers.
    assert {"dspy_circuit_breaker_state", "dspy_queue_length"} <= api_families
    assert {"dspy_active_predictions", "dspy_predictions_total"} <= worker_families
