"""The breaker's books under concurrency, and its state without traffic (issue 13, classes 2, 3).

Real processes: a private Redis, the mock LLM of this module (its fault counter is
exact: ``error_every`` fails every Nth call, never two in a row), two Celery workers
(A consumes ``interactive``, B consumes ``batch``) and the API.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from dspy_fleet.devtools.services import Service
from tests.conftest import TEST_ENV, OwnStack, poll

# Run alone by `make test`: the burst must really run 100 calls at once, which a second
# module's load beside it can prevent.
pytestmark = pytest.mark.serial

BASE = (
    'api_base: "${DSPY_FLEET_MOCK_LLM_URL}", input_price_per_1k: 0.001, output_price_per_1k: 0.002'
)
CONFIG = f"""
default_model: mock
models:
  # Retried calls land on the fault counter too: enough retries that no job runs out.
  mock: {{litellm_model: openai/mock-gpt, max_retries: 8, {BASE}}}
  down: {{litellm_model: openai/down, max_retries: 0, breaker: {{recovery_seconds: 2}}, {BASE}}}
  tripped: {{litellm_model: openai/tripped, max_retries: 0, breaker: {{recovery_seconds: 2}},
            {BASE}}}
  idle: {{litellm_model: openai/idle, {BASE}}}
programs:
  qa: {{signature: "question -> answer"}}
"""
BURST = 150  # jobs started together
LATENCY_MS = 2000  # long enough for the whole burst to be in flight at once
ENV = {
    "DSPY_FLEET_BREAKER_FAILURE_THRESHOLD": "3",
    # Above the burst's failures (a fifth of ~190 calls with retries), below its calls:
    # the rate policy is live, and a fifth is far under its 50 %.
    "DSPY_FLEET_BREAKER_MIN_CALLS": "60",
    "DSPY_FLEET_CONCURRENCY": str(BURST + 10),
    "DSPY_FLEET_RETRY_BACKOFF_SECONDS": "0.05",
}


class Fleet(OwnStack):
    """This module's stack: its own mock LLM, two workers and an API."""

    a: Service
    b: Service

    def http(self, timeout: float = 60) -> httpx.Client:
        assert self.api is not None
        return httpx.Client(base_url=self.api.url, timeout=timeout)

    def breaker(self, model: str) -> str:
        """The breaker state /ready reports (200 or 503, it is in the components)."""
        with self.http() as client:
            body = client.get("/ready").json()
        components = body.get("components") or body["error"]["details"]["components"]
        return str(components["breakers"]["states"][model])

    def gauge(self) -> dict[str, float]:
        """dspy_circuit_breaker_state of every model, as the API's /metrics shows it (its
        one exporter: the workers do not export it)."""
        assert self.api is not None
        text = httpx.get(f"{self.api.url}/metrics", timeout=10).text
        found = re.findall(r'^dspy_circuit_breaker_state\{model="([^"]+)"\} (\S+)$', text, re.M)
        return {model: float(value) for model, value in found}

    def worker_families(self, worker: Service) -> set[str]:
        """The metric families ``worker``'s /metrics exports."""
        port = worker.env["DSPY_FLEET_METRICS_PORT"]
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        return set(re.findall(r"^# TYPE (\S+) ", text, re.M))

    def chat_calls(self) -> int:
        return int(self.mock.stats()["chat_completions"])


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    base: Path = tmp_path_factory.mktemp("breaker-books")
    (base / "fleet.yaml").write_text(CONFIG)
    stack = Fleet(base, env={**TEST_ENV, **ENV, "DSPY_FLEET_CONFIG": str(base / "fleet.yaml")})
    try:
        stack.start_redis()
        stack.start_mock_llm()
        with stack.together():
            stack.a = stack.start_worker("worker-a", DSPY_FLEET_QUEUES="interactive")
            stack.b = stack.start_worker("worker-b", DSPY_FLEET_QUEUES="batch")
            stack.start_api()
        yield stack
    finally:
        stack.stop()


@pytest.fixture
def mock(fleet: Fleet) -> Iterator[Fleet]:
    fleet.mock.reset()
    fleet.mock.set_faults(error_every=0)
    yield fleet
    fleet.mock.reset()
    fleet.mock.set_faults(error_every=0)


def _max_overlap(jobs: list[dict[str, Any]]) -> int:
    """The most jobs that were running at one moment (from their started/finished times)."""
    edges = []
    for job in jobs:
        edges.append((datetime.fromisoformat(job["started_at"]), 1))
        edges.append((datetime.fromisoformat(job["finished_at"]), -1))
    running = most = 0
    for _, step in sorted(edges):
        running += step
        most = max(most, running)
    return most


def test_a_burst_against_a_partly_failing_provider_never_opens_the_breaker(mock: Fleet) -> None:
    # A fifth of the calls fail, never two in a row; the threshold is three in a row.
    mock.mock.set_faults(error_every=5, error_status=503, latency_ms=LATENCY_MS)
    items = [{"custom_id": f"b{i}", "input": f"burst {uuid.uuid4().hex}", "use_cache": False,
              "priority": "batch"} for i in range(BURST)]  # fmt: skip
    with mock.http() as http:
        created = http.post("/v1/batches", json=items)
        assert created.status_code == 202, created.text
        batch_id = created.json()["id"]
        poll(lambda: http.get(f"/v1/batches/{batch_id}").json()["counts"]["pending"] == 0,
             timeout=90, interval=0.5)  # fmt: skip
        lines = http.get(f"/v1/batches/{batch_id}/results").text.splitlines()
    results = [json.loads(line) for line in lines if line]
    codes = [r.get("error", {}).get("code") for r in results if r.get("status") != "succeeded"]
    client = redis.Redis.from_url(mock.redis_url, decode_responses=True)
    jobs = [client.hgetall(f"dspy_fleet:job:{r['id']}") for r in results]
    first_try = [j for j in jobs if j.get("attempts") == "1" and j.get("status") == "succeeded"]
    stats = mock.mock.stats()
    print(f"\nburst of {BURST}: {stats['chat_completions']} provider calls, "
          f"{stats['failed']} failed; {_max_overlap(first_try)} jobs in flight at once; "
          f"not succeeded: {codes}")  # fmt: skip

    assert _max_overlap(first_try) >= 100  # the burst really started together
    assert stats["failed"] >= 25  # the provider did fail a fifth of the calls
    assert "circuit_open" not in codes
    assert codes == []  # every job succeeded (the failed calls were retried)
    assert mock.breaker("mock") == "closed"
    # Never opened: an opening stamps opened_at on the breaker's hash.
    assert client.hget("dspy_fleet:breaker:mock", "opened_at") is None


def test_a_provider_failing_every_call_opens_the_breaker(mock: Fleet) -> None:
    mock.mock.set_faults(error_every=1, error_status=500)
    with mock.http() as http:
        for i in range(3):
            body = {"input": f"down {i} {uuid.uuid4().hex}", "model": "down", "wait": 20,
                    "use_cache": False, "priority": "interactive"}  # fmt: skip
            failed = http.post("/v1/predict", json=body).json()
            assert failed["error"]["code"] == "provider_error", failed
        assert mock.breaker("down") == "open"
        refused = http.post("/v1/predict", json={**body, "input": "refused"}).json()
    assert refused["error"]["code"] == "circuit_open"
    assert mock.chat_calls() == 3


def test_open_turns_half_open_after_the_recovery_window_without_traffic(mock: Fleet) -> None:
    mock.mock.set_faults(error_every=1, error_status=500)
    with mock.http() as http:
        for i in range(3):  # worker A (interactive) sees the failures
            body = {"input": f"trip {i} {uuid.uuid4().hex}", "model": "tripped", "wait": 20,
                    "use_cache": False, "priority": "interactive"}  # fmt: skip
            assert http.post("/v1/predict", json=body).json()["status"] == "failed"
    opened = time.monotonic()
    assert mock.breaker("tripped") == "open"
    # The gauge is the fleet's state, for every model (`idle` was never called), exported
    # by the API; no worker exports a copy of it.
    assert mock.gauge()["tripped"] == 1
    assert mock.gauge()["idle"] == 0
    for worker in (mock.a, mock.b):
        assert "dspy_circuit_breaker_state" not in mock.worker_families(worker)
    mock.mock.set_faults(error_every=0)  # the provider heals; nothing is sent from now on
    mock.mock.reset_stats()
    calls = mock.chat_calls()

    def half_open() -> bool:
        return mock.breaker("tripped") == "half_open" and mock.gauge()["tripped"] == 2

    poll(half_open, timeout=2 + 1.5, interval=0.1)  # recovery_seconds: 2, + a margin
    took = time.monotonic() - opened
    print(f"\nopen -> half_open shown {took:.2f} s after opening (recovery 2 s), no traffic")
    assert mock.chat_calls() == calls == 0
    # A half-open breaker still admits probes, which close it.
    with mock.http() as http:
        for i in range(2):
            body = {"input": f"probe {i}", "model": "tripped", "wait": 20, "use_cache": False}
            assert http.post("/v1/predict", json=body).json()["status"] == "succeeded"
    assert mock.breaker("tripped") == "closed"
    assert mock.gauge()["tripped"] == 0
