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

from tests.conftest import MockLLM, Service, poll, start_api
from tests.observability.conftest import children_of, isolated_redis_url, scrape, total
from worker.dev.procs import http_ok, wait_until
from worker.dev.redis import RedisServer

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
