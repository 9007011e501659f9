"""The API's /metrics is exact under gunicorn with two workers, and samples the queues.

The API here runs on its own Redis database with no worker behind it, so the
jobs it enqueues stay in the broker's lists where the queue gauge can see them.
"""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis

from dspy_fleet.devtools.procs import http_ok, wait_until
from dspy_fleet.devtools.redis import RedisServer
from dspy_fleet.store.breakers import PREFIX
from dspy_fleet.store.pacing import PREFIX as PACE_PREFIX
from dspy_fleet.store.pacing import Limits, Pacer, Scope
from tests.conftest import MockLLM, Service, poll, start_api
from tests.observability.conftest import children_of, isolated_redis_url, scrape, total

REQUESTS = 300


@dataclass
class Api:
    service: Service
    metrics_dir: Path

    def worker_pids(self) -> set[int]:
        """gunicorn workers that have written request counts."""
        return {
            int(m.group(1))
            for db in self.metrics_dir.glob("counter_*.db")
            if (m := re.search(r"_(\d+)\.db$", db.name))
        }


@pytest.fixture(scope="module")
def api_alone(redis_server: RedisServer, mock_llm: MockLLM, logs_dir: Path) -> Iterator[Api]:
    """`dspy-fleet api` with 2 gunicorn workers (start_api's default), its own database."""
    metrics_dir = logs_dir / "api-metrics"
    metrics_dir.mkdir(exist_ok=True)
    (metrics_dir / "counter_999999.db").write_bytes(b"stale: must be removed at start")
    svc = start_api(
        isolated_redis_url(redis_server),
        mock_llm.url,
        logs_dir / "api-metrics.log",
        PROMETHEUS_MULTIPROC_DIR=str(metrics_dir),
    )
    yield Api(service=svc, metrics_dir=metrics_dir)
    svc.child.stop()


def _hammer(url: str, paths: list[str]) -> list[int]:
    # Separate connections from 8 threads: gunicorn spreads them over both workers.
    def get(path: str) -> int:
        return httpx.get(url + path, timeout=10).status_code

    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(get, paths))


def test_one_scrape_counts_every_request_of_both_workers(api_alone: Api) -> None:
    url = api_alone.service.url
    paths = ["/", "/no-such-page"] * (REQUESTS // 2)
    codes = _hammer(url, paths)
    assert codes.count(200) == codes.count(404) == REQUESTS // 2

    samples = scrape(url + "/metrics")
    counted = {
        (labels["endpoint"], labels["status"]): value
        for name, labels, value in samples
        if name == "dspy_api_requests_total" and labels["endpoint"] != "/health"
    }
    assert counted == {("/", "200"): REQUESTS // 2, ("unmatched", "404"): REQUESTS // 2}
    assert total(samples, "dspy_api_request_duration_seconds_count", endpoint="/") == REQUESTS / 2
    # Both gunicorn workers answered some of them (else this proves nothing).
    assert len(api_alone.worker_pids()) == 2, api_alone.worker_pids()


def test_counts_survive_a_worker_killed_and_replaced(api_alone: Api) -> None:
    url = api_alone.service.url
    before = total(scrape(url + "/metrics"), "dspy_api_requests_total", endpoint="/")
    victim = sorted(api_alone.worker_pids())[0]
    os.kill(victim, signal.SIGKILL)
    # gunicorn's master starts a replacement; its child_exit hook marks the old pid dead.
    master = api_alone.service.child.pid
    poll(lambda: len(set(children_of(master)) - {victim}) == 2, timeout=30, interval=0.1)
    wait_until(http_ok(url + "/health"), 30, "API after a worker was killed")
    _hammer(url, ["/"] * 100)
    after = total(scrape(url + "/metrics"), "dspy_api_requests_total", endpoint="/")
    # The dead worker's requests still count: its counter file outlives it.
    assert after == before + 100
    assert api_alone.service.child.alive()


def test_queue_length_is_sampled_from_the_broker(api_alone: Api) -> None:
    url = api_alone.service.url
    for i in range(3):
        resp = httpx.post(
            url + "/v1/predict",
            json={"input": f"queued {i}?", "priority": "batch", "use_cache": False},
            timeout=10,
        )
        assert resp.status_code == 202, resp.text
    resp = httpx.post(url + "/v1/predict", json={"input": "one more?", "use_cache": False})
    assert resp.status_code == 202, resp.text

    # Several scrapes, answered by either worker, all agree (mostrecent, not a sum).
    for _ in range(6):
        samples = scrape(url + "/metrics")
        assert total(samples, "dspy_queue_length", queue="batch") == 3
        assert total(samples, "dspy_queue_length", queue="interactive") == 1
    assert total(samples, "dspy_jobs_enqueued_total", queue="batch") == 3
    assert total(samples, "dspy_jobs_enqueued_total", queue="interactive") == 1


def test_breaker_state_is_read_from_the_fleets_redis_at_scrape_time(api_alone: Api) -> None:
    """The API is the one exporter of dspy_circuit_breaker_state: it reads the shared state
    in Redis at each scrape, for every configured model, whether anyone called it or not."""
    client = redis.Redis.from_url(api_alone.service.env["DSPY_FLEET_REDIS_URL"])
    url = api_alone.service.url + "/metrics"

    def states() -> dict[str, float]:
        return {
            labels["model"]: value
            for name, labels, value in scrape(url)
            if name == "dspy_circuit_breaker_state"
        }

    try:
        # Never used: closed, for both models of the default config.
        assert states() == {"mock": 0, "gpt-4o-mini": 0}
        (now, _) = client.time()
        # What a worker's record script writes when a breaker opens (store/breakers.py).
        client.hset(PREFIX + "mock", mapping={"state": "open", "opened_at": now,
                                              "recovers_at": now + 300})  # fmt: skip
        # Several scrapes, answered by either gunicorn worker, all see it at once.
        assert [states()["mock"] for _ in range(4)] == [1, 1, 1, 1]
        assert states()["gpt-4o-mini"] == 0
        # Its recovery window passed with no traffic: half-open, no call needed to show it.
        client.hset(PREFIX + "mock", "recovers_at", now - 1)
        assert states()["mock"] == 2
        client.hset(PREFIX + "mock", "state", "closed")
        assert states()["mock"] == 0
    finally:
        client.delete(PREFIX + "mock")


def test_effective_rate_is_read_from_the_pacers_state_at_scrape_time(api_alone: Api) -> None:
    """dspy_rate_limit_effective_rpm: no sample while a model is unlimited (the default
    config configures no rpm); once a 429 taught the pacer a rate (what a worker's cut
    writes to Redis), every scrape shows it, growing back without traffic."""
    url = api_alone.service.url + "/metrics"
    client = redis.Redis.from_url(api_alone.service.env["DSPY_FLEET_REDIS_URL"])
    pacer = Pacer(client, {"mock": [Scope("model:mock", Limits())]})

    def rates(name: str) -> dict[str, float]:
        return {labels["model"]: value for n, labels, value in scrape(url) if n == name}

    try:
        assert rates("dspy_rate_limit_effective_rpm") == {}
        cut = pacer.cut("mock", retry_after=None)[0]
        assert cut.cut and cut.rpm > 0
        first = rates("dspy_rate_limit_effective_rpm")
        assert set(first) == {"mock"} and first["mock"] >= cut.rpm
        assert rates("dspy_rate_limit_configured_rpm") == {}  # learned, not configured
    finally:
        client.delete(*client.keys(PACE_PREFIX + "model:mock*"))
