"""The worker's /metrics is exact under prefork and threads: one scrape counts every job.

The classic prefork bug: each pool child starts its own metrics server, one of
them binds the port, and a scrape shows that child's share only. Each fleet
here has its own Redis database, so it runs exactly the jobs the test sends.
"""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from prometheus_client.mmap_dict import MmapedDict, mmap_key

from dspy_fleet.devtools.redis import RedisServer
from tests.conftest import MockLLM, Service, poll, start_worker
from tests.observability.conftest import (
    children_of,
    isolated_redis_url,
    scrape,
    send_jobs,
    total,
    worker_metrics_url,
)

JOBS = 100


@dataclass
class Fleet:
    """A worker on its own Redis database, with its metrics directory."""

    pool: str
    broker_url: str
    worker: Service
    metrics_dir: Path

    @property
    def metrics(self) -> str:
        return worker_metrics_url(self.worker) + "/metrics"


def _stale_counts(metrics_dir: Path) -> None:
    """What a crashed earlier run leaves behind: 1,000 predictions of a dead pid."""
    metrics_dir.mkdir(parents=True, exist_ok=True)
    stale = MmapedDict(str(metrics_dir / "counter_999999.db"))
    key = mmap_key(
        "dspy_predictions",
        "dspy_predictions_total",
        ["program", "model", "variant", "status"],
        ["qa", "mock", "none", "succeeded"],
        "Predictions finished, by outcome.",
    )
    stale.write_value(key, 1000.0, 0.0)
    stale.close()


def _start_fleet(
    pool: str,
    concurrency: int,
    redis_server: RedisServer,
    mock_llm: MockLLM,
    logs_dir: Path,
) -> Fleet:
    broker_url = isolated_redis_url(redis_server)
    metrics_dir = logs_dir / f"worker-metrics-{pool}"
    _stale_counts(metrics_dir)
    worker = start_worker(
        broker_url,
        mock_llm.url,
        logs_dir / f"worker-{pool}.log",
        DSPY_FLEET_POOL=pool,
        DSPY_FLEET_CONCURRENCY=str(concurrency),
        DSPY_FLEET_SOFT_SHUTDOWN_TIMEOUT="1",  # quick teardown
        # A killed child's job is taken over when its lease lapses (its message, handed back
        # at once by reject_on_worker_lost, finds the lease live and leaves the job to it).
        DSPY_FLEET_LEASE_SECONDS="3",
        # An operator-given directory (as in a container with a read-only root FS).
        PROMETHEUS_MULTIPROC_DIR=str(metrics_dir),
    )
    return Fleet(pool=pool, broker_url=broker_url, worker=worker, metrics_dir=metrics_dir)


@pytest.fixture(scope="module")
def prefork_fleet(redis_server: RedisServer, mock_llm: MockLLM, logs_dir: Path) -> Iterator[Fleet]:
    """A prefork worker with two pool children."""
    fleet = _start_fleet("prefork", 2, redis_server, mock_llm, logs_dir)
    yield fleet
    fleet.worker.child.stop()


@pytest.fixture(scope="module")
def threads_fleet(redis_server: RedisServer, mock_llm: MockLLM, logs_dir: Path) -> Iterator[Fleet]:
    """A threads-pool worker (the default pool)."""
    fleet = _start_fleet("threads", 16, redis_server, mock_llm, logs_dir)
    yield fleet
    fleet.worker.child.stop()


def _pids_with_predictions(metrics_dir: Path) -> set[int]:
    pids = set()
    for db in metrics_dir.glob("counter_*.db"):
        values = MmapedDict.read_all_values_from_file(str(db))
        if any('"dspy_predictions_total"' in e[0] and e[1] > 0 for e in values):
            pids.add(int(re.search(r"_(\d+)\.db$", db.name).group(1)))
    return pids - {999999}


@pytest.mark.parametrize("pool", ["prefork", "threads"])
def test_one_scrape_counts_every_prediction(pool: str, request: pytest.FixtureRequest) -> None:
    fleet: Fleet = request.getfixturevalue(f"{pool}_fleet")
    mock: MockLLM = request.getfixturevalue("mock_llm")
    mock.reset()

    for result in send_jobs(fleet.broker_url, JOBS):
        assert result.get(timeout=120)["status"] == "succeeded"
    samples = scrape(fleet.metrics)

    assert total(samples, "dspy_predictions_total") == JOBS
    assert total(samples, "dspy_predictions_total", status="succeeded") == JOBS
    assert total(samples, "dspy_prediction_duration_seconds_count", program="qa") == JOBS
    assert total(samples, "dspy_active_predictions") == 0
    calls = mock.stats()["chat_completions"]
    assert calls >= JOBS
    assert total(samples, "dspy_token_usage_total", type="input") > JOBS * 10
    assert total(samples, "dspy_token_usage_total", type="output") > 0
    assert total(samples, "dspy_prediction_cost_total", model="mock") > 0
    if pool == "prefork":
        # The jobs really ran in two pool children, not in the process that serves /metrics.
        children = _pids_with_predictions(fleet.metrics_dir) - {fleet.worker.child.pid}
        assert len(children) == 2, children


@pytest.mark.parametrize("pool", ["prefork", "threads"])
def test_health_is_served_by_the_main_process(pool: str, request: pytest.FixtureRequest) -> None:
    fleet: Fleet = request.getfixturevalue(f"{pool}_fleet")
    resp = httpx.get(worker_metrics_url(fleet.worker) + "/health", timeout=5)
    assert resp.status_code == 200
    body = resp.json()
    assert body["status"] == "ok"
    # Exactly one server, in the main process (never in a pool child).
    assert body["pid"] == fleet.worker.child.pid
    assert httpx.get(worker_metrics_url(fleet.worker) + "/nope", timeout=5).status_code == 404


def test_a_killed_child_no_longer_counts_as_active(prefork_fleet: Fleet, mock_llm: MockLLM) -> None:
    mock_llm.reset()
    mock_llm.set_faults(latency_ms=4000)
    try:
        results = send_jobs(prefork_fleet.broker_url, 2)

        def active() -> float:
            return total(scrape(prefork_fleet.metrics), "dspy_active_predictions")

        poll(lambda: active() == 2, timeout=20)
        busy = [
            int(m.group(1))
            for db in prefork_fleet.metrics_dir.glob("gauge_livesum_*.db")
            if (m := re.search(r"_(\d+)\.db$", db.name))
            and any(e[1] == 1 for e in MmapedDict.read_all_values_from_file(str(db)))
        ]
        children = children_of(prefork_fleet.worker.child.pid)
        victim = next(pid for pid in busy if pid in children)
        os.kill(victim, signal.SIGKILL)
        # The killed child never ran its shutdown signal: the scrape must notice it is gone.
        poll(lambda: active() == 1, timeout=10)
        assert prefork_fleet.worker.child.alive()
    finally:
        mock_llm.set_faults(latency_ms=0)
    # The other job, and the killed one redelivered (acks_late), still finish.
    for result in results:
        result.get(timeout=60)
    time.sleep(0.2)
    assert total(scrape(prefork_fleet.metrics), "dspy_active_predictions") == 0


def _listening_addresses(port: int) -> set[str]:
    """The IPv4 addresses something listens on at ``port`` (from /proc/net/tcp)."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, hex_port = local.split(":")
        if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
            found.add(".".join(str(int(address[i : i + 2], 16)) for i in (6, 4, 2, 0)))
    return found


def test_metrics_listen_on_loopback_unless_told_otherwise(
    threads_fleet: Fleet, redis_server: RedisServer, mock_llm: MockLLM, tmp_path: Path
) -> None:
    # Like the API and Flower: nothing but this host reaches it by default.
    port = int(threads_fleet.worker.env["DSPY_FLEET_METRICS_PORT"])
    assert _listening_addresses(port) == {"127.0.0.1"}
    # The image and the chart set 0.0.0.0 so Prometheus and the kubelet reach it.
    everywhere = start_worker(redis_server.url, mock_llm.url, tmp_path / "worker.log",
                              DSPY_FLEET_METRICS_HOST="0.0.0.0")  # fmt: skip
    try:
        port = int(everywhere.env["DSPY_FLEET_METRICS_PORT"])
        assert poll(lambda: _listening_addresses(port), timeout=30) == {"0.0.0.0"}
    finally:
        everywhere.child.stop()


@pytest.mark.parametrize("pool", ["prefork", "threads"])
def test_start_up_logs_no_error_and_counts_every_process(
    pool: str, request: pytest.FixtureRequest
) -> None:
    # Celery's CLI imports prometheus_client (through Flower's plugin) before any of our
    # code runs; the worker must still end up in multiprocess mode, and say nothing alarming.
    fleet: Fleet = request.getfixturevalue(f"{pool}_fleet")
    lines = fleet.worker.log_lines()
    ready = next(i for i, line in enumerate(lines) if line.get("message") == "worker ready")
    alarming = [line for line in lines[: ready + 1] if line["level"] in ("ERROR", "CRITICAL")]
    assert not alarming, alarming
    (listening,) = [line for line in lines if line.get("message") == "metrics server listening"]
    assert listening["multiprocess"] is True
