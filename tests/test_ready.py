"""/health checks nothing external; /ready does a real round-trip and names what failed."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from api.auth import hash_key, new_key
from dspy_fleet.devtools.redis import RedisServer
from tests.conftest import MockLLM, Service, poll, start_api, start_worker, stop_all, wait_all_ready


@pytest.fixture
def own_stack(mock_llm: MockLLM, tmp_path: Path) -> Iterator[tuple[RedisServer, Service]]:
    """A Redis, worker and API of this test's own, so stopping Redis disturbs no other test."""
    redis_server = RedisServer(log_path=tmp_path / "redis.log").start()
    worker = start_worker(redis_server.url, mock_llm.url, tmp_path / "worker.log", wait=False)
    api = start_api(redis_server.url, mock_llm.url, tmp_path / "api.log", wait=False)
    wait_all_ready(worker, api)  # started side by side
    yield redis_server, api
    stop_all(api, worker)
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
    # Public and unauthenticated (open mode too): the cause, never the internal address.
    assert error["details"]["components"]["redis"] == {"ok": False, "error": "redis unreachable"}
    assert str(redis_server.port) not in down.text and "127.0.0.1" not in down.text
    # Liveness does not depend on Redis: the process itself is fine.
    assert client.get("/health").status_code == 200
    # Submitting while Redis is down is refused cleanly, never a 500, named by its cause.
    refused = client.post("/v1/predict", json={"input": "What is 2+2?"})
    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "redis_unavailable"

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


def test_ready_tells_only_an_admin_key_where_redis_is(mock_llm: MockLLM, tmp_path: Path) -> None:
    keys = {"acme": new_key(), "ops": new_key()}
    entries = f"acme:{hash_key(keys['acme'])},ops:{hash_key(keys['ops'])}:admin"
    redis_server = RedisServer(log_path=tmp_path / "redis.log").start()
    api = start_api(redis_server.url, mock_llm.url, tmp_path / "api.log",
                    DSPY_FLEET_API_KEYS=entries)  # fmt: skip
    try:
        redis_server.stop()
        port = str(redis_server.port)
        for who, key in [("no key", None), ("tenant key", keys["acme"]), ("bad key", "dfk_x")]:
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            resp = httpx.get(api.url + "/ready", headers=headers, timeout=10)
            assert resp.status_code == 503, who
            redis_state = resp.json()["error"]["details"]["components"]["redis"]
            assert redis_state == {"ok": False, "error": "redis unreachable"}, who
            assert port not in resp.text, who
        admin = httpx.get(api.url + "/ready", headers={"Authorization": f"Bearer {keys['ops']}"},
                          timeout=10)  # fmt: skip
        redis_state = admin.json()["error"]["details"]["components"]["redis"]
        assert redis_state["error"] == "redis unreachable"
        assert port in redis_state["detail"]  # redis-py's own words, for the operator
    finally:
        api.child.stop()
        redis_server.stop()


def test_ready_says_when_webhooks_are_due_and_no_worker_delivers_them(
    mock_llm: MockLLM, tmp_path: Path
) -> None:
    """Predictions need no callbacks consumer, so /ready stays 200; it says that webhooks
    are piling up undelivered, and stops saying it once a worker consumes the queue."""
    redis_server = RedisServer(log_path=tmp_path / "redis.log").start()
    env = {"DSPY_FLEET_CALLBACK_ALLOW": "127.0.0.1/32"}
    worker = start_worker(redis_server.url, mock_llm.url, tmp_path / "worker.log", wait=False,
                          DSPY_FLEET_QUEUES="interactive,batch", **env)  # fmt: skip
    api = start_api(redis_server.url, mock_llm.url, tmp_path / "api.log", wait=False, **env)
    wait_all_ready(worker, api)
    deliverer = None
    try:
        client = httpx.Client(base_url=api.url, timeout=30)
        idle = client.get("/ready").json()["components"]["callbacks"]
        assert idle == {"ok": True, "workers": 0, "due": 0}  # nothing due: nothing to say
        body = {"input": "What is 2+2?", "wait": 20, "callback_url": "http://127.0.0.1:9/hook"}
        assert client.post("/v1/predict", json=body).json()["status"] == "succeeded"
        ready = client.get("/ready")
        assert ready.status_code == 200, ready.text
        callbacks = ready.json()["components"]["callbacks"]
        assert callbacks["workers"] == 0 and callbacks["due"] == 1, callbacks
        assert "no live worker consumes the 'callbacks' queue" in callbacks["warning"]
        deliverer = start_worker(redis_server.url, mock_llm.url, tmp_path / "deliverer.log",
                                 **env)  # fmt: skip
        now = client.get("/ready").json()["components"]["callbacks"]
        assert now["workers"] == 1 and "warning" not in now, now
    finally:
        stop_all(*[s for s in (api, worker, deliverer) if s is not None])
        redis_server.stop()
