"""A real Prometheus server against a real stack, loading monitoring/'s rules (issue 19).

What an operator would run: Prometheus (Debian package `prometheus`) scrapes the API, a
worker, celery-exporter and Flower with monitoring/prometheus.yml's jobs (static targets
on this test's ports instead of DNS discovery), loads the real rule file, and is asked
through its HTTP API (/api/v1/query, /api/v1/alerts, /api/v1/rules, /api/v1/targets):

(a) at idle after start-up no alert is pending or firing, and every dashboard query has a
    value or an empty result, which Grafana shows as the panel's "no data" text (only the
    panels listed in test_monitoring.IDLE_NO_DATA may be empty, none under traffic);
(b) during a provider outage (the mock LLM fails every call) the breaker alert and both
    error-rate alerts fire;
(c) after recovery, with no traffic at all, they end within the time monitoring/README.md
    documents;
(d) a 30 s burst of errors does not page (DspyHighErrorRate never fires).

Time is compressed: the rules' windows and `for:` are minutes, so the test loads the rule
file with every duration (range windows, subquery steps, `for:`) divided by COMPRESSION,
scrapes and evaluates every second, and runs the stack's breakers with the default
recovery window divided alike (30 s -> 3 s). A compressed second stands for COMPRESSION
real seconds; the figures are printed both ways. The promtool unit tests
(monitoring/alerts/tests/) prove the same properties in real durations; this test proves
the rules hold against what the processes really export, end to end.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from dspy_fleet.devtools.procs import free_port
from tests.conftest import TEST_ENV, OwnStack, poll
from tests.observability.conftest import (
    require_tool,
    scrape,
    start_celery_exporter,
    start_flower,
    worker_metrics_url,
)
from tests.observability.test_monitoring import (
    DASHBOARDS,
    IDLE_NO_DATA,
    MONITORING,
    RULES,
    _panels,
    legend_labels,
)

# Run alone by `make test`: alert timings in compressed seconds are asserted.
pytestmark = pytest.mark.serial

COMPRESSION = 10
# The default breaker recovery window (BREAKER_RECOVERY_SECONDS), real seconds.
RECOVERY_S = 30
# Compressed seconds of measuring slop: a scrape (1 s), an evaluation (1 s), polling
# (0.25 s) and the last in-flight jobs' results.
SLACK = 3.0
# Real-time bounds, as monitoring/README.md documents them (seconds after the outage
# starts / after the last failure, with no traffic).
FIRES_WITHIN = {
    "DspyErrorRateElevated": 60,
    "DspyCircuitBreakerOpen": 120,
    "DspyHighErrorRate": 240,
}
ENDS_WITHIN = {
    "DspyErrorRateElevated": 75,
    "DspyCircuitBreakerOpen": RECOVERY_S + 75,
    "DspyHighErrorRate": 75,
}
OUTAGE_ALERTS = set(FIRES_WITHIN)
CRITICAL_FOR_S = 180  # DspyHighErrorRate's `for:`
BURST_S = 30

CONFIG = """
default_model: mock
models:
  # No provider retries: a failing call fails its job at once.
  # An rpm far above this test's traffic: never throttles, but the rate-limit panel has
  # a configured and an effective rate to show.
  mock: {litellm_model: openai/mock-gpt, api_base: "${DSPY_FLEET_MOCK_LLM_URL}",
         max_retries: 0, input_price_per_1k: 0.001, output_price_per_1k: 0.002,
         rpm: 600000}
  # Configured, never called (a fallback nobody needed): its breaker must stay closed
  # and no alert may name it.
  spare: {litellm_model: openai/spare, api_base: "${DSPY_FLEET_MOCK_LLM_URL}"}
programs:
  qa: {signature: "question -> answer"}
"""

_UNITS_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
_DURATION = re.compile(r"(\d+)(ms|s|m|h|d)")


def compress(duration: str) -> str:
    """A Prometheus duration divided by COMPRESSION, in ms ("5m" -> "30000ms")."""
    parts = _DURATION.findall(duration)
    assert parts and "".join(n + u for n, u in parts) == duration, f"not a duration: {duration}"
    ms = sum(int(n) * _UNITS_MS[u] for n, u in parts)
    assert ms % COMPRESSION == 0, f"{duration} does not divide by {COMPRESSION}"
    return f"{ms // COMPRESSION}ms"


def compress_expr(expr: str) -> str:
    """Every range window and subquery step of a PromQL expression, compressed."""
    assert " offset " not in expr and "@" not in expr, "compress offsets and @ too"

    def window(match: re.Match[str]) -> str:
        return "[" + ":".join(compress(p) if p else p for p in match.group(1).split(":")) + "]"

    return re.sub(r"\[([^\]]+)\]", window, expr)


def compressed_rules(path: Path) -> dict[str, Any]:
    """The rule file with every duration divided by COMPRESSION."""
    doc = yaml.safe_load(path.read_text())
    for group in doc["groups"]:
        for rule in group["rules"]:
            rule["expr"] = compress_expr(rule["expr"])
            if "for" in rule:
                rule["for"] = compress(rule["for"])
    return doc


def test_compression_divides_every_duration() -> None:
    assert compress("5m") == "30000ms" and compress("15s") == "1500ms"
    assert compress("1h") == "360000ms" and compress("1m30s") == "9000ms"
    assert compress_expr("avg_over_time((x == bool 1)[2m:15s]) > 0.5") == (
        "avg_over_time((x == bool 1)[12000ms:1500ms]) > 0.5"
    )
    assert compress_expr('rate(a{b="c"}[10m]) / rate(a[1m])') == (
        'rate(a{b="c"}[60000ms]) / rate(a[6000ms])'
    )
    with pytest.raises(AssertionError):
        compress("15ms")  # 1.5 ms would silently round: refuse


def prometheus_config(targets: dict[str, str], rule_files: list[Path]) -> dict[str, Any]:
    """monitoring/prometheus.yml with this test's targets and compressed rule files."""
    config = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s", scrape_timeout="1s")
    config["rule_files"] = [str(p) for p in rule_files]
    jobs = {job["job_name"] for job in config["scrape_configs"]}
    assert jobs == set(targets), f"a job of prometheus.yml has no target here: {jobs}"
    for job in config["scrape_configs"]:
        job.pop("dns_sd_configs", None)
        job["static_configs"] = [{"targets": [targets[job["job_name"]]]}]
        if job["job_name"] == "celery-exporter":
            # Each of its scrapes asks the workers (celery inspect stats, active_queues:
            # 1 s broadcast timeout each), so it takes ~2 s: scraped every 4 s here (40 s
            # in real time; 15 s of the 2 s it takes in prometheus.yml).
            job.update(scrape_interval="4s", scrape_timeout="4s")
    return config


class Prometheus:
    """Prometheus's HTTP API."""

    def __init__(self, url: str) -> None:
        self.http = httpx.Client(base_url=url, timeout=10)

    def _get(self, path: str, **params: str) -> Any:
        body = self.http.get(path, params=params).json()
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query's series: [{"metric": {...}, "value": [t, "v"]}]."""
        return list(self._get("/api/v1/query", query=expr)["result"])

    def alerts(self) -> dict[tuple[str, str], str]:
        """(alertname, model) -> "pending" | "firing", for every active alert."""
        return {
            (a["labels"]["alertname"], a["labels"].get("model", "")): a["state"]
            for a in self._get("/api/v1/alerts")["alerts"]
        }

    def rules(self) -> list[dict[str, Any]]:
        return [rule for group in self._get("/api/v1/rules")["groups"] for rule in group["rules"]]

    def targets(self) -> dict[str, str]:
        """job -> health of its target ("up", or the state and the last scrape's error)."""
        return {
            t["labels"]["job"]: "up" if t["health"] == "up" else f"{t['health']}: {t['lastError']}"
            for t in self._get("/api/v1/targets")["activeTargets"]
        }


class Traffic:
    """Predictions sent to the API from a thread at a steady rate until stopped."""

    def __init__(self, api_url: str, per_second: float, tag: str) -> None:
        self.http = httpx.Client(base_url=api_url, timeout=10)
        self.interval = 1 / per_second
        self.tag = tag
        self.sent = 0
        self.last_sent = 0.0
        self.refused: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"traffic-{tag}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            body = {"input": f"{self.tag} {uuid.uuid4().hex}", "model": "mock", "use_cache": False}
            resp = self.http.post("/v1/predict", json=body)
            if resp.status_code != 202:
                self.refused.append(f"{resp.status_code} {resp.text[:200]}")
            self.sent += 1
            self.last_sent = time.monotonic()
            self._stop.wait(self.interval)

    def stop(self) -> float:
        """Stop sending; returns when the last prediction was sent (monotonic)."""
        self._stop.set()
        self._thread.join(10)
        self.http.close()
        assert not self.refused, self.refused[:3]
        return self.last_sent


@dataclass
class Watch:
    """When each (alert, model) was first seen pending and firing, polling /api/v1/alerts."""

    prometheus: Prometheus
    since: float = field(default_factory=time.monotonic)
    first: dict[tuple[str, str, str], float] = field(default_factory=dict)
    now: dict[tuple[str, str], str] = field(default_factory=dict)

    def poll(self) -> dict[tuple[str, str], str]:
        self.now = self.prometheus.alerts()
        t = time.monotonic() - self.since
        for (name, model), state in self.now.items():
            self.first.setdefault((name, model, state), t)
        return self.now

    def until(self, done: Callable[[dict[tuple[str, str], str]], bool], timeout: float) -> float:
        """Poll until ``done(alerts)``; seconds since ``since``. Fails after ``timeout``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if done(self.poll()):
                return time.monotonic() - self.since
            time.sleep(0.25)
        raise AssertionError(f"not reached within {timeout} s; alerts now: {self.now}")


def _finite(series: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [s for s in series if math.isfinite(float(s["value"][1]))]


@dataclass
class Panel:
    id: int
    title: str
    ref: str
    expr: str
    legend: str


def panel_queries(rate_interval: str) -> list[Panel]:
    """Every dashboard target with Grafana's variables substituted (all models)."""
    variables = {"$__rate_interval": rate_interval, "$__interval": "2s", "$__range": "1h",
                 "$model": ".*"}  # fmt: skip
    out = []
    for path in DASHBOARDS:
        for panel in _panels(json.loads(path.read_text())):
            for target in panel.get("targets", []):
                expr = target["expr"]
                for var, value in variables.items():
                    expr = expr.replace(var, value)
                out.append(Panel(panel["id"], panel["title"], target["refId"], expr,
                                 target.get("legendFormat", "")))  # fmt: skip
    return out


def check_panels(prometheus: Prometheus, rate_interval: str, *, idle: bool) -> dict[str, int]:
    """Evaluate every panel target; returns series counts. At idle, a target may be empty
    (no series: Grafana shows the panel's "no data" text) only in an IDLE_NO_DATA panel;
    under traffic none may be. A result of NaN alone is never allowed (Grafana would draw
    an empty graph, not say "no data"). Every {{label}} of a legend is on every series."""
    counts = {}
    for p in panel_queries(rate_interval):
        where = f"panel {p.id} {p.title!r} {p.ref}"
        series = prometheus.query(p.expr)
        assert len(_finite(series)) == len(series), f"{where}: NaN series {series}"
        counts[where] = len(series)
        if not series:
            assert idle, f"{where} is empty under traffic: {p.expr}"
            assert p.id in IDLE_NO_DATA, f"{where} is empty at idle: {p.expr}"
        for s in series:
            missing = legend_labels(p.legend) - set(s["metric"])
            assert not missing, f"{where}: legend {p.legend!r} names {missing}, not on {s}"
    return counts


@dataclass
class Live:
    stack: OwnStack
    api: str
    worker_metrics: str
    prometheus: Prometheus


@pytest.fixture(scope="module")
def live(exporter_python: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    prometheus_bin = require_tool(
        shutil.which("prometheus"), "prometheus", "run `make test-tools` (apt package prometheus)"
    )
    base = tmp_path_factory.mktemp("live-prometheus")
    (base / "fleet.yaml").write_text(CONFIG)
    env = {
        **TEST_ENV,
        "DSPY_FLEET_CONFIG": str(base / "fleet.yaml"),
        "DSPY_FLEET_BREAKER_RECOVERY_SECONDS": str(RECOVERY_S / COMPRESSION),
    }
    stack = OwnStack(base, env=env)
    try:
        stack.start_redis()
        mock = stack.start_mock_llm()
        worker = stack.start_worker("worker")
        api = stack.start_api("api")
        exporter = start_celery_exporter(stack, exporter_python, stack.redis_url)
        flower = start_flower(stack, stack.redis_url, mock.url)
        # Start-up is over once the exporter has seen the worker (else DspyNoLiveWorkers
        # is rightly pending: no worker known yet).
        exporter_metrics = exporter.url + "/metrics"
        poll(lambda: any(n == "celery_worker_up" and v for n, _, v in scrape(exporter_metrics)),
             timeout=30, interval=0.2)  # fmt: skip
        port = free_port()
        host = "127.0.0.1"
        targets = {
            "dspy-api": api.url.removeprefix("http://"),
            "dspy-worker": worker_metrics_url(worker).removeprefix("http://"),
            "celery-exporter": exporter.url.removeprefix("http://"),
            "flower": flower.url.removeprefix("http://"),
            "prometheus": f"{host}:{port}",
        }
        rule_files = []
        for path in RULES:
            compressed = base / path.name
            compressed.write_text(yaml.safe_dump(compressed_rules(path), sort_keys=False))
            rule_files.append(compressed)
        config = base / "prometheus.yml"
        config.write_text(yaml.safe_dump(prometheus_config(targets, rule_files), sort_keys=False))
        argv = [prometheus_bin, f"--config.file={config}", f"--storage.tsdb.path={base / 'tsdb'}",
                f"--web.listen-address={host}:{port}", "--log.level=warn"]  # fmt: skip
        stack.start_process("prometheus", argv, url=f"http://{host}:{port}",
                            health_path="/-/ready", cwd=base)  # fmt: skip
        yield Live(stack, api.url, worker_metrics_url(worker) + "/metrics",
                   Prometheus(f"http://{host}:{port}"))  # fmt: skip
    finally:
        stack.stop()


def _report(rows: list[tuple[str, str, float, float]]) -> None:
    print(
        f"\n{'alert':<24} {'event':<34} {'compressed s':>12} {'≈ real s':>9} {'bound real s':>12}"
    )
    for alert, event, measured, bound in rows:
        real = measured * COMPRESSION
        print(f"{alert:<24} {event:<34} {measured:>12.1f} {real:>9.0f} {bound:>12.0f}")


def test_alerts_and_panels_against_a_real_prometheus(live: Live) -> None:
    prom = live.prometheus
    mock = live.stack.mock
    rows: list[tuple[str, str, float, float]] = []

    # --- (a) idle after start-up --------------------------------------------------------
    expected = {rule["alert"] for path in RULES for g in yaml.safe_load(path.read_text())["groups"]
                for rule in g["rules"] if "alert" in rule}  # fmt: skip
    assert {r["name"] for r in prom.rules() if r["type"] == "alerting"} == expected
    jobs = {job["job_name"] for job in yaml.safe_load((MONITORING / "prometheus.yml").read_text())[
        "scrape_configs"]}  # fmt: skip
    targets: dict[str, str] = {}
    for _ in range(80):
        targets = prom.targets()
        if set(targets) == jobs and set(targets.values()) == {"up"}:
            break
        time.sleep(0.25)
    assert set(targets) == jobs and set(targets.values()) == {"up"}, targets
    # Every rule evaluated without error (health "unknown" until its first evaluation).
    poll(lambda: {r["health"] for r in prom.rules()} == {"ok"}, timeout=10, interval=0.25)
    # Before Prometheus's first scrape of celery-exporter, absent(up{...}) holds and
    # DspyCeleryExporterDown is pending (it needs 5 min to fire): Prometheus's own start-up.
    # Two evaluations after every target is up, that is over.
    time.sleep(2)
    # Long enough for every short window to fill: a condition that holds shows up pending
    # at the first evaluation that sees it.
    idle = Watch(prom)
    deadline = time.monotonic() + 8
    while time.monotonic() < deadline:
        assert idle.poll() == {}, f"alerts at idle: {idle.now}"
        time.sleep(0.25)
    idle_counts = check_panels(prom, "2m", idle=True)
    empty_at_idle = sorted(k for k, n in idle_counts.items() if n == 0)
    print(f"\npanels with no data at idle ({len(empty_at_idle)} of {len(idle_counts)} targets):")
    print("\n".join(f"  {k}" for k in empty_at_idle))

    # --- healthy traffic: successes and cache hits; nothing fires -----------------------
    with httpx.Client(base_url=live.api, timeout=30) as http:

        def pair(i: int) -> None:
            for _ in range(2):  # the second is a cache hit (the API's L2 fast path)
                body = {"input": f"healthy {i}?", "model": "mock", "wait": 20}
                resp = http.post("/v1/predict", json=body)
                assert resp.json()["status"] == "succeeded", resp.text
                # Judged, for the feedback panels.
                job = resp.json()["id"]
                judged = http.post(f"/v1/predictions/{job}/feedback", json={"score": i / 5})
                assert judged.status_code == 201, judged.text

        pair(0)
        # A counter's first increments happen before its series exists, so rate() cannot
        # see them: let Prometheus scrape the new series (the exporter's every 4 s) first.
        poll(lambda: prom.query('celery_task_runtime_count{name="dspy_fleet.predict"}')
             and prom.query("dspy_predictions_total"), timeout=15, interval=0.25)  # fmt: skip
        for i in range(1, 6):
            pair(i)
    time.sleep(2)  # two scrapes and evaluations
    assert prom.alerts() == {}

    # --- (b) provider outage -------------------------------------------------------------
    mock.set_faults(error_rate=1.0, error_status=500)
    outage = Watch(prom)
    # 10/s: 1 prediction per real second, the promtool tests' outage.
    traffic = Traffic(live.api, per_second=10, tag="outage")
    try:
        outage.until(lambda a: all(a.get((n, "mock")) == "firing" for n in OUTAGE_ALERTS),
                     timeout=max(FIRES_WITHIN.values()) / COMPRESSION + 4 * SLACK)  # fmt: skip
        # Under traffic (healthy, cache hits, then the outage), no panel is empty.
        check_panels(prom, "2m", idle=False)
    finally:
        last_sent = traffic.stop()
        mock.set_faults(error_rate=0)
    assert not any(model == "spare" for _, model, _ in outage.first), outage.first
    for name in sorted(OUTAGE_ALERTS):
        fired = outage.first[(name, "mock", "firing")]
        rows.append((name, "outage start -> firing", fired, FIRES_WITHIN[name]))
        assert fired <= FIRES_WITHIN[name] / COMPRESSION + SLACK, (name, fired)

    # --- (c) recovery with no traffic ---------------------------------------------------
    calls = mock.stats()["chat_completions"]
    recovery = Watch(prom, since=last_sent)
    ended: dict[str, float] = {}

    def all_ended(alerts: dict[tuple[str, str], str]) -> bool:
        t = time.monotonic() - last_sent
        for name in OUTAGE_ALERTS:
            if (name, "mock") not in alerts:
                ended.setdefault(name, t)
        return len(ended) == len(OUTAGE_ALERTS)

    recovery.until(all_ended, timeout=max(ENDS_WITHIN.values()) / COMPRESSION + 4 * SLACK)
    # Ended for good: none comes back while nothing happens.
    for _ in range(4):
        assert not OUTAGE_ALERTS & {name for name, _ in recovery.poll()}, recovery.now
        time.sleep(0.25)
    for name in sorted(OUTAGE_ALERTS):
        rows.append((name, "last request -> resolved", ended[name], ENDS_WITHIN[name]))
        assert ended[name] <= ENDS_WITHIN[name] / COMPRESSION + SLACK, (name, ended[name])
    # Nothing was sent meanwhile (no probe either), and the breaker reads half-open.
    assert mock.stats()["chat_completions"] == calls
    state = prom.query('max by (model) (dspy_circuit_breaker_state{model="mock"})')
    assert [s["value"][1] for s in state] == ["2"], state

    # --- (d) a 30 s burst of errors: the page's condition holds, but not for its `for:` --
    mock.set_faults(error_rate=1.0, error_status=500)
    burst_wall = time.time()  # Prometheus's sample timestamps are wall-clock seconds
    burst = Watch(prom)
    traffic = Traffic(live.api, per_second=15, tag="burst")
    try:
        time.sleep(BURST_S / COMPRESSION)
    finally:
        last_sent = traffic.stop()
        mock.set_faults(error_rate=0)
    burst_started = burst.since

    def page_condition_over(alerts: dict[tuple[str, str], str]) -> bool:
        assert alerts.get(("DspyHighErrorRate", "mock")) != "firing", "a 30 s burst paged"
        return ("DspyHighErrorRate", "mock", "pending") in burst.first and (
            "DspyHighErrorRate", "mock") not in alerts  # fmt: skip

    over = burst.until(page_condition_over, timeout=CRITICAL_FOR_S / COMPRESSION + 2 * SLACK)
    held = over - burst.first[("DspyHighErrorRate", "mock", "pending")]
    # Prometheus's own record of it: never firing over the whole burst. The range reaches a
    # little before the burst, so samples are kept from its start on: the outage's own
    # firing may have a last sample a second or two before it (CI saw one).
    span = f"{math.ceil(time.monotonic() - burst_started) + 2}s"
    series = prom.query(f'ALERTS{{alertname="DspyHighErrorRate",alertstate="firing"}}[{span}]')
    paged = [v for s in series for v in s["values"] if float(v[0]) >= burst_wall]
    assert paged == [], series
    rows.append(("DspyHighErrorRate", f"{BURST_S} s burst: pending for", held, CRITICAL_FOR_S))
    assert held < CRITICAL_FOR_S / COMPRESSION
    warned = ("DspyErrorRateElevated", "mock", "firing") in burst.first
    _report(rows)
    print(f"burst: {traffic.sent} predictions in {BURST_S / COMPRESSION:.0f} s; warning fired: "
          f"{warned}; last sent {time.monotonic() - last_sent:.1f} s ago")  # fmt: skip
