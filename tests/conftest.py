"""Fixtures that start the real services: a private Redis, the mock LLM, a Celery worker, the API.

Every service runs as its own process on a free port, exactly as in production
(minus the container), and is stopped when the session ends.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

# Set before anything imports dspy/litellm in the test process (unit tests do).
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("DSPY_CACHEDIR", tempfile.mkdtemp(prefix="dspy-fleet-test-dspy-"))

from worker.dev.procs import Child, free_port, http_ok, wait_until  # noqa: E402
from worker.dev.redis import RedisServer  # noqa: E402

PY = sys.executable


@pytest.fixture(scope="session")
def logs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the service processes write their logs (kept for debugging failures)."""
    return tmp_path_factory.mktemp("service-logs")


@pytest.fixture(scope="session")
def redis_server(logs_dir: Path) -> Iterator[RedisServer]:
    """A private redis-server on a free port."""
    server = RedisServer(log_path=logs_dir / "redis.log").start()
    yield server
    server.stop()


@dataclass
class MockLLM:
    """The mock LLM server process and helpers to read and steer it."""

    url: str  # .../v1, what LiteLLM gets as api_base
    base: str
    child: Child

    def stats(self) -> dict[str, Any]:
        """Its request counters."""
        return httpx.get(f"{self.base}/_mock/stats", timeout=5).json()

    def reset(self) -> None:
        """Zero the counters and clear injected faults."""
        httpx.post(f"{self.base}/_mock/reset", timeout=5).raise_for_status()
        self.set_faults(latency_ms=0, error_rate=0, fail_next=0, hang_rate=0)

    def set_faults(self, **faults: Any) -> None:
        """Change fault injection at run time."""
        httpx.put(f"{self.base}/_mock/faults", json=faults, timeout=5).raise_for_status()


@pytest.fixture(scope="session")
def mock_llm(logs_dir: Path) -> Iterator[MockLLM]:
    """The project's OpenAI-compatible mock LLM server, as a separate process."""
    port = free_port()
    child = Child(
        "mock-llm",
        [PY, "-m", "worker.mock_llm", "--port", str(port)],
        log_path=logs_dir / "mock-llm.log",
    )
    base = f"http://127.0.0.1:{port}"
    wait_until(http_ok(base + "/health"), 30, "mock LLM", child.proc)
    yield MockLLM(url=base + "/v1", base=base, child=child)
    child.stop()


def service_env(redis_url: str, mock_url: str, **extra: str) -> dict[str, str]:
    """Environment of a worker or API process pointed at these services."""
    return {
        "DSPY_FLEET_REDIS_URL": redis_url,
        "DSPY_FLEET_MOCK_LLM_URL": mock_url,
        "DSPY_FLEET_LOG_LEVEL": "INFO",
        **extra,
    }


@dataclass
class Service:
    """A started worker or API process."""

    child: Child
    log_path: Path
    url: str = ""
    env: dict[str, str] = field(default_factory=dict)

    def log_lines(self) -> list[dict[str, Any]]:
        """Its JSON log lines (non-JSON lines, e.g. Celery's banner, are skipped)."""
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
        return out


def start_worker(redis_url: str, mock_url: str, log_path: Path, **extra: str) -> Service:
    """Start `dspy-fleet worker` and wait until it is consuming (its heartbeat is in Redis)."""
    env = service_env(redis_url, mock_url, DSPY_FLEET_METRICS_PORT=str(free_port()), **extra)
    # Celery node names must be unique per broker (heartbeats and Flower key on them).
    node = f"{log_path.stem}-{uuid.uuid4().hex[:6]}@%h"
    child = Child(
        "worker", [PY, "-m", "worker.cli", "worker", "--hostname", node], env=env, log_path=log_path
    )
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    prefix = node.split("@")[0] + "@"

    def beating() -> bool:  # this worker's own heartbeat, not another one's
        return any(name.startswith(prefix) for name in client.zrange("dspy_fleet:workers", 0, -1))

    wait_until(beating, 60, "worker", child.proc)
    return Service(child=child, log_path=log_path, env=env)


def start_api(redis_url: str, mock_url: str, log_path: Path, **extra: str) -> Service:
    """Start `dspy-fleet api` (gunicorn) on a free port and wait for /health."""
    port = free_port()
    env = service_env(
        redis_url, mock_url, DSPY_FLEET_API_PORT=str(port), DSPY_FLEET_API_WORKERS="2", **extra
    )
    child = Child("api", [PY, "-m", "worker.cli", "api"], env=env, log_path=log_path)
    url = f"http://127.0.0.1:{port}"
    wait_until(http_ok(url + "/health"), 60, "API", child.proc)
    return Service(child=child, log_path=log_path, url=url, env=env)


@pytest.fixture(scope="session")
def worker(redis_server: RedisServer, mock_llm: MockLLM, logs_dir: Path) -> Iterator[Service]:
    """A real Celery worker process (threads pool) consuming both queues."""
    svc = start_worker(redis_server.url, mock_llm.url, logs_dir / "worker.log")
    yield svc
    svc.child.stop()


@pytest.fixture(scope="session")
def api(redis_server: RedisServer, mock_llm: MockLLM, logs_dir: Path) -> Iterator[Service]:
    """The API under gunicorn (2 workers), as a separate process."""
    svc = start_api(redis_server.url, mock_llm.url, logs_dir / "api.log")
    yield svc
    svc.child.stop()


@pytest.fixture
def api_client(api: Service, worker: Service) -> Iterator[httpx.Client]:
    """An HTTP client for the running API, with a worker behind it."""
    with httpx.Client(base_url=api.url, timeout=30) as client:
        yield client


def poll(check: Callable[[], Any], timeout: float = 20, interval: float = 0.05) -> Any:
    """Call ``check`` until it returns something truthy; fail with its last value."""
    deadline = time.monotonic() + timeout
    value = None
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s (last value: {value!r})")


def wait_for_job(client: httpx.Client, job_id: str, timeout: float = 20) -> dict[str, Any]:
    """Poll GET /v1/predictions/<id> until the job ends; return its body."""

    def done() -> dict[str, Any] | None:
        body = client.get(f"/v1/predictions/{job_id}").json()
        return body if body.get("status") in ("succeeded", "failed", "cancelled") else None

    return poll(done, timeout)
