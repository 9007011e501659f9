"""Shared pieces of the chaos suite: a stack of its own per test, load, and bookkeeping.

Every test here starts its own Redis (with AOF), workers and API, breaks
something for real (SIGKILL, SIGTERM, Redis restart, provider outage) and then
checks that every accepted job ended and was billed exactly once.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from tests.conftest import MockLLM, Service, start_api, start_worker
from worker.dev.redis import RedisServer
from worker.jobs import JobStore

# Short enough that jobs of a killed worker come back within seconds.
FAST_REDELIVERY = {
    "DSPY_FLEET_SOFT_TIME_LIMIT": "10",
    "DSPY_FLEET_TIME_LIMIT": "12",
    "DSPY_FLEET_VISIBILITY_TIMEOUT_SECONDS": "15",
    "DSPY_FLEET_RESTORE_SWEEP_SECONDS": "1",
    # Lost-message recovery: sweep every beat, for jobs queued 5 s and nowhere in Redis.
    "DSPY_FLEET_HEARTBEAT_SECONDS": "1",
    "DSPY_FLEET_RECOVERY_AFTER_SECONDS": "5",
}


@dataclass
class ChaosStack:
    """One Redis (AOF on), workers and an API, all owned by one test."""

    dir: Path
    mock: MockLLM
    env: dict[str, str]
    redis_server: RedisServer
    api: Service | None = None
    workers: list[Service] = field(default_factory=list)

    def start_worker(self, **env: str) -> Service:
        log = self.dir / f"worker-{len(self.workers)}.log"
        svc = start_worker(self.redis_server.url, self.mock.url, log, **{**self.env, **env})
        self.workers.append(svc)
        return svc

    def start_api(self) -> Service:
        self.api = start_api(self.redis_server.url, self.mock.url, self.dir / "api.log", **self.env)
        return self.api

    @property
    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(self.redis_server.url, decode_responses=True)

    def statuses(self, ids: Iterable[str]) -> dict[str, str | None]:
        """Each job's status, one pipelined round-trip."""
        ids = list(ids)
        pipe = self.redis.pipeline(transaction=False)
        for job_id in ids:
            pipe.hget(f"dspy_fleet:job:{job_id}", "status")
        return dict(zip(ids, pipe.execute(), strict=True))

    def wait_all(self, ids: list[str], timeout: float) -> dict[str, str | None]:
        """Wait until every job ended; returns the final statuses (or what they were)."""
        deadline = time.monotonic() + timeout
        while True:
            st = self.statuses(ids)
            if all(s in ("succeeded", "failed", "cancelled") for s in st.values()):
                return st
            if time.monotonic() > deadline:
                return st
            time.sleep(0.5)

    def all_job_ids(self) -> list[str]:
        """Every job recorded in this Redis."""
        return [k.removeprefix("dspy_fleet:job:") for k in self.redis.scan_iter("dspy_fleet:job:*")]

    def records(self, ids: list[str]) -> list[dict[str, Any]]:
        store = JobStore(self.redis, 3600)
        return [store.get(i) or {} for i in ids]

    def costs(self) -> dict[str, Any]:
        assert self.api is not None
        return httpx.get(self.api.url + "/costs", timeout=10).json()["totals"]

    def stop(self) -> None:
        for svc in [*([self.api] if self.api else []), *self.workers]:
            svc.child.stop()
        self.redis_server.stop()


@pytest.fixture
def chaos(mock_llm: MockLLM, tmp_path: Path) -> Iterator[ChaosStack]:
    mock_llm.reset()
    server = RedisServer(appendonly=True, log_path=tmp_path / "redis.log").start()
    stack = ChaosStack(tmp_path, mock_llm, dict(FAST_REDELIVERY), server)
    yield stack
    stack.stop()
    mock_llm.reset()


def post_many(url: str, bodies: list[dict[str, Any]], threads: int = 8) -> list[httpx.Response]:
    """POST /v1/predict for each body from a few client threads (keep-alive connections)."""

    def run(chunk: list[dict[str, Any]]) -> list[httpx.Response]:
        with httpx.Client(base_url=url, timeout=30) as client:
            return [client.post("/v1/predict", json=b) for b in chunk]

    chunks = [bodies[i::threads] for i in range(threads)]
    with ThreadPoolExecutor(threads) as pool:
        return [r for part in pool.map(run, chunks) for r in part]


def assert_billed_once(records: list[dict[str, Any]], totals: dict[str, Any]) -> None:
    """The fleet's cost aggregates equal the sum of the per-job cost records."""
    costs = [r["cost"] for r in records]
    assert totals["requests"] == len(records)
    assert totals["input_tokens"] == sum(c["input_tokens"] for c in costs)
    assert totals["output_tokens"] == sum(c["output_tokens"] for c in costs)
    assert abs(totals["cost_usd"] - sum(c["cost_usd"] or 0 for c in costs)) < 1e-6
