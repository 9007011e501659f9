"""A stack of its own for the producer and client tests: they stop the worker (to keep jobs
queued for cancelling) and flood the queues, which must not disturb the session stack."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis

from dspy_fleet.broker.producer import Producer
from dspy_fleet.settings import CommonSettings, load_settings
from tests.conftest import TEST_ENV, MockLLM, OwnStack, Service

# Small enough that the limit test stays cheap, large enough for the 500-item batch.
MAX_BATCH_ITEMS = 600


class Fleet(OwnStack):
    """Redis, at most one worker and the API of this package, plus helpers."""

    worker: Service | None = None

    def http(self, timeout: float = 60) -> httpx.Client:
        return httpx.Client(base_url=self.api.url, timeout=timeout)

    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(self.redis_url, decode_responses=True)

    def producer(self) -> Producer:
        """A direct producer whose jobs get the due sweep's first look after 1 s, like the
        package API's."""
        settings = load_settings(CommonSettings, redis_url=self.redis_url, recovery_after_seconds=1)
        return Producer(settings=settings)

    def start_worker(self, name: str | None = None, **options: Any) -> Service:
        """Replace the package's worker by a new one (with a log of its own)."""
        self.stop_worker()
        self.worker = super().start_worker(name, **options)
        return self.worker

    def stop_worker(self) -> None:
        if self.worker is not None:
            self.stop(self.worker.name)
            self.worker = None
            # Forget its heartbeat, so that tests see no live worker at once.
            self.redis().delete("dspy_fleet:workers")

    def ensure_worker(self) -> Service:
        return self.worker or self.start_worker()

    def worker_logs(self) -> list[dict[str, Any]]:
        return self.worker.log_lines() if self.worker else []


@pytest.fixture(scope="package")
def fleet(mock_llm: MockLLM, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """Private Redis and API (the worker is started by the tests that need one)."""
    stack = Fleet(tmp_path_factory.mktemp("clients"), env=TEST_ENV)
    stack.use_mock_llm(mock_llm)
    stack.start_redis()
    # Jobs it accepts get their first look from the workers' due sweep after 1 s (the tests
    # of lost publishes wait for it); a job still waiting in its queue is left there.
    stack.start_api(
        DSPY_FLEET_MAX_BATCH_ITEMS=str(MAX_BATCH_ITEMS), DSPY_FLEET_RECOVERY_AFTER_SECONDS="1"
    )
    yield stack
    stack.stop()


@pytest.fixture
def running(fleet: Fleet) -> Fleet:
    """The package's stack with a worker consuming both queues, the mock LLM at 0 latency."""
    fleet.mock.reset()
    fleet.ensure_worker()
    return fleet
