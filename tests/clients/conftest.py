"""A stack of its own for the producer and client tests: they stop the worker (to keep jobs
queued for cancelling) and flood the queues, which must not disturb the session stack."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from tests.conftest import MockLLM, Service, start_api, start_worker
from worker.dev.redis import RedisServer
from worker.producer import Producer

# Small enough that the limit test stays cheap, large enough for the 500-item batch.
MAX_BATCH_ITEMS = 600


@dataclass
class Fleet:
    """Redis, a worker and the API of this package, plus helpers."""

    redis_server: RedisServer
    mock: MockLLM
    dir: Path
    api: Service
    worker: Service | None = None

    @property
    def redis_url(self) -> str:
        return self.redis_server.url

    def http(self, timeout: float = 60) -> httpx.Client:
        return httpx.Client(base_url=self.api.url, timeout=timeout)

    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(self.redis_url, decode_responses=True)

    def producer(self) -> Producer:
        return Producer(redis_url=self.redis_url)

    def start_worker(self, **env: str) -> Service:
        self.stop_worker()
        self.worker = start_worker(
            self.redis_url, self.mock.url, self.dir / f"worker-{uuid.uuid4().hex[:6]}.log", **env
        )
        return self.worker

    def stop_worker(self) -> None:
        if self.worker is not None:
            self.worker.child.stop()
            self.worker = None
            # Forget its heartbeat, so that tests see no live worker at once.
            self.redis().delete("dspy_fleet:workers")

    def ensure_worker(self) -> Service:
        return self.worker or self.start_worker()

    def worker_logs(self) -> list[dict[str, Any]]:
        lines: list[dict[str, Any]] = []
        for svc in [self.worker] if self.worker else []:
            lines += svc.log_lines()
        return lines


@pytest.fixture(scope="package")
def fleet(mock_llm: MockLLM, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """Private Redis and API (the worker is started by the tests that need one)."""
    workdir = tmp_path_factory.mktemp("clients")
    server = RedisServer(log_path=workdir / "redis.log").start()
    api = start_api(
        server.url,
        mock_llm.url,
        workdir / "api.log",
        DSPY_FLEET_MAX_BATCH_ITEMS=str(MAX_BATCH_ITEMS),
    )
    stack = Fleet(redis_server=server, mock=mock_llm, dir=workdir, api=api)
    yield stack
    stack.stop_worker()
    api.child.stop()
    server.stop()


@pytest.fixture
def running(fleet: Fleet) -> Fleet:
    """The package's stack with a worker consuming both queues, the mock LLM at 0 latency."""
    fleet.mock.reset()
    fleet.ensure_worker()
    return fleet
