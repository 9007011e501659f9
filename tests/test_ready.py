"""/health checks nothing external; /ready does a real round-trip and names what failed."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import MockLLM, Service, poll, start_api, start_worker
from worker.dev.redis import RedisServer


@pytest.fixture
def own_stack(mock_llm: MockLLM, tmp_path: Path) -> Iterator[tuple[RedisServer, Service]]:
    """A Redis, worker and API of this test's own, so stopping Redis disturbs no other test."""
    redis_server = RedisServer(log_path=tmp_path / "redis.log").start()
    worker = start_worker(redis_server.url, mock_llm.url, tmp_path / "worker.log")
    api = start_api(redis_server.url, mock_llm.url, tmp_path / "api.log")
    yield redis_server, api
    api.child.stop()
    worker.child.stop()
    redis_server.stop()


def test_ready_follows_redis_down_and_back(own_stack: tuple[RedisServer, Service]) -> None:
    redis_server, api = own_stack
    client = httpx.Client(base_url=api.url, timeout=10)
    ready = client.get("/ready")
    assert ready.status_code == 200, ready.text
    assert ready.json()["components"]["workers"]["live"] == 1

    redis_server.stop()
    down = client.get("/ready")
    assert down.status_code == 503
    error = down.json()["error"]
    assert error["code"] == "not_ready"
    assert "redis" in error["details"]["failing"]
    assert "redis" in error["message"]
    # Liveness does not depend on Redis: the process itself is fine.
    assert client.get("/health").status_code == 200
    # Submitting while Redis is down is refused cleanly, never a 500.
    refused = client.post("/v1/predict", json={"input": "What is 2+2?"})
    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "broker_unavailable"

    redis_server.start()  # same port, a fresh empty server
    # No restart of the API: its pool reconnects; the worker beats again into the new Redis.
    back = poll(lambda: client.get("/ready").status_code == 200, timeout=30)
    assert back
    done = client.post("/v1/predict", json={"input": "What is 2+2?", "wait": 20})
    assert done.status_code == 200, done.text
    assert done.json()["outputs"]["answer"] == "4"


def test_ready_names_missing_workers(
    redis_server: RedisServer, mock_llm: MockLLM, tmp_path: Path
) -> None:
    # A Redis database no worker beats into.
    api = start_api(redis_server.url.rsplit("/", 1)[0] + "/5", mock_llm.url, tmp_path / "api.log")
    try:
        resp = httpx.get(api.url + "/ready", timeout=10)
        assert resp.status_code == 503
        details = resp.json()["error"]["details"]
        assert details["failing"] == ["workers"]
        assert details["components"]["workers"]["queues_without_workers"] == [
            "interactive",
            "batch",
        ]
        health = httpx.get(api.url + "/health", timeout=10).json()
        assert health["status"] == "ok" and health["version"] and health["uptime_seconds"] >= 0
    finally:
        api.child.stop()
