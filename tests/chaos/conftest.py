"""Shared pieces of the chaos suite: a stack of its own per test, load, and bookkeeping.

Every test here starts its own Redis (with AOF), workers and API, breaks
something for real (SIGKILL, SIGTERM, Redis restart, provider outage) and then
checks that every accepted job ended and was billed exactly once.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import httpx
import pytest
import redis

from dspy_fleet.settings import DEFAULT_CONFIG_FILE
from dspy_fleet.store import connection
from dspy_fleet.store.jobs import JobStore
from tests.conftest import TEST_ENV, MockLLM, OwnStack

# Short enough that jobs of a killed worker come back within seconds.
FAST_REDELIVERY = {
    "DSPY_FLEET_SOFT_TIME_LIMIT": "10",
    "DSPY_FLEET_TIME_LIMIT": "12",
    "DSPY_FLEET_VISIBILITY_TIMEOUT_SECONDS": "15",
    "DSPY_FLEET_RESTORE_SWEEP_SECONDS": "1",
    # Lost-message recovery: sweep every beat, for jobs queued 5 s and nowhere in Redis.
    "DSPY_FLEET_HEARTBEAT_SECONDS": "1",
    "DSPY_FLEET_RECOVERY_AFTER_SECONDS": "5",
    # A killed worker's jobs are taken over once their lease lapses.
    "DSPY_FLEET_LEASE_SECONDS": "5",
}


def chaos_config(path: Path, timeout: float = 9) -> Path:
    """The default models and programs with model ``timeout`` (default 9 s: inside the
    10 s soft time limit, as start-up requires); returns ``path``."""
    text = DEFAULT_CONFIG_FILE.read_text(encoding="utf-8")
    assert "timeout: 30" in text
    path.write_text(text.replace("timeout: 30", f"timeout: {timeout:g}"), encoding="utf-8")
    return path


class ChaosStack(OwnStack):
    """One Redis (AOF on), workers and an API, all owned by one test, plus its bookkeeping."""

    @property
    def redis(self) -> redis.Redis:
        """A client of the stack's Redis (through its Sentinels for a redis+sentinel:// URL)."""
        return connection.redis_client(
            self.redis_url,
            sentinel_password=self.env.get("DSPY_FLEET_SENTINEL_PASSWORD"),
            decode_responses=True,
        )

    def statuses(self, ids: Iterable[str]) -> dict[str, str | None]:
        """Each job's status, one pipelined round-trip."""
        ids = list(ids)
        pipe = self.redis.pipeline(transaction=False)
        for job_id in ids:
            pipe.hget(f"dspy_fleet:job:{job_id}", "status")
        return dict(zip(ids, pipe.execute(), strict=True))

    def wait_all(self, ids: list[str], timeout: float) -> dict[str, str | None]:
        """Wait until every job ended; returns the final statuses (or what they were).
        A job that ended is not read again: its status is terminal."""
        deadline = time.monotonic() + timeout
        st: dict[str, str | None] = dict.fromkeys(ids)
        left = list(ids)
        while True:
            st.update(self.statuses(left))
            left = [j for j in left if st[j] not in ("succeeded", "failed", "cancelled")]
            if not left or time.monotonic() > deadline:
                return st
            time.sleep(0.5)

    def wait_succeeded(self, ids: list[str], count: float, timeout: float = 240) -> None:
        """Wait until at least ``count`` of the jobs succeeded. Polled 4 times a second, and
        only the jobs not yet seen succeeded (a terminal status): the fleet under test needs
        the 2 cores more than this loop does."""
        left = list(ids)
        deadline = time.monotonic() + timeout
        while True:
            left = [j for j, s in self.statuses(left).items() if s != "succeeded"]
            if len(ids) - len(left) >= count:
                return
            assert time.monotonic() < deadline, f"{len(ids) - len(left)} < {count} succeeded"
            time.sleep(0.25)

    def all_job_ids(self) -> list[str]:
        """Every job recorded in this Redis."""
        return [k.removeprefix("dspy_fleet:job:") for k in self.redis.scan_iter("dspy_fleet:job:*")]

    def records(self, ids: list[str]) -> list[dict[str, Any]]:
        store = JobStore(self.redis, 3600)
        return [store.get(i) or {} for i in ids]

    def costs(self) -> dict[str, Any]:
        assert self.api is not None
        return httpx.get(self.api.url + "/costs", timeout=10).json()["totals"]


@pytest.fixture
def chaos(mock_llm: MockLLM, tmp_path: Path) -> Iterator[ChaosStack]:
    """A stack of the test's own on the session's mock LLM; nothing started but Redis."""
    mock_llm.reset()
    config = chaos_config(tmp_path / "chaos-fleet.yaml")
    stack = ChaosStack(
        tmp_path, env={**TEST_ENV, **FAST_REDELIVERY, "DSPY_FLEET_CONFIG": str(config)}
    )
    stack.use_mock_llm(mock_llm)
    stack.start_redis(appendonly=True)
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


@dataclass
class SubmitStream:
    """``clients`` threads posting single jobs to ``api_url`` until the ``with`` block ends,
    through whatever the test breaks meanwhile; what they were answered.

    A connection error is counted as code 0 (never expected: the API itself stays up).
    ``pause`` s after every answer, ``refused_pause`` s more after one that is not a 202."""

    api_url: str
    prefix: str = "s"
    clients: int = 4
    pause: float = 0.0
    refused_pause: float = 0.0
    accepted: list[str] = field(default_factory=list)  # job ids answered 202
    codes: Counter[int] = field(default_factory=Counter)
    refusals: Counter[str] = field(default_factory=Counter)  # error codes of the others
    answered: list[tuple[float, int]] = field(default_factory=list)  # (monotonic, status)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def __enter__(self) -> Self:
        self._threads = [threading.Thread(target=self._submit, args=(n,))
                         for n in range(self.clients)]  # fmt: skip
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()

    def accepting_since(self, since: float) -> bool:
        """Whether a 202 came after ``since`` and after the last 503."""
        answered = list(self.answered)
        last_503 = max((t for t, code in answered if code == 503), default=since)
        return any(code == 202 and t > max(since, last_503) for t, code in answered)

    def _submit(self, n: int) -> None:
        with httpx.Client(base_url=self.api_url, timeout=30) as client:
            i = 0
            while not self._stop.is_set():
                i += 1
                body = {"input": f"{self.prefix}{n}-{i}: What is {i}+2?", "use_cache": False}
                try:
                    resp = client.post("/v1/predict", json=body)
                except httpx.HTTPError:
                    self.codes[0] += 1
                    continue
                self.codes[resp.status_code] += 1
                self.answered.append((time.monotonic(), resp.status_code))
                if resp.status_code == 202:
                    self.accepted.append(resp.json()["id"])
                else:
                    self.refusals[resp.json()["error"]["code"]] += 1
                    time.sleep(self.refused_pause)
                time.sleep(self.pause)


def assert_billed_once(records: list[dict[str, Any]], totals: dict[str, Any]) -> None:
    """The fleet's cost aggregates equal the sum of the per-job cost records."""
    costs = [r["cost"] for r in records]
    assert totals["requests"] == len(records)
    assert totals["input_tokens"] == sum(c["input_tokens"] for c in costs)
    assert totals["output_tokens"] == sum(c["output_tokens"] for c in costs)
    assert abs(totals["cost_usd"] - sum(c["cost_usd"] or 0 for c in costs)) < 1e-6
