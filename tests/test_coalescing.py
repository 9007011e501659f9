"""Coalescing of identical requests that does not stampede when the model call is slow.

The leader's lock lives as long as its call (renewed by one thread per process);
when the leader fails or dies exactly one follower takes over. Unit tests run
PredictionCache on a real redis-server; the fleet tests run real workers and count
provider calls with the mock LLM's own counter.
"""

from __future__ import annotations

import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from dspy_fleet.devtools.procs import free_port
from dspy_fleet.devtools.redis import RedisServer
from dspy_fleet.errors import JobTimeoutError
from dspy_fleet.store.cache import LOCK_PREFIX, LockRenewer, PredictionCache
from tests.conftest import TEST_ENV, MockLLM, OwnStack, poll

# --- unit level: PredictionCache on a real Redis --------------------------------------------


@pytest.fixture
def client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    """A client of the session's Redis, the way the worker builds one."""
    c = redis.Redis.from_url(redis_server.url, decode_responses=True, socket_timeout=5)
    yield c
    c.close()


# Lock TTL of the unit tests: short, yet with a margin for a renewer delayed by a busy machine.
LOCK_S = 0.8


def make_cache(client: redis.Redis, lock_seconds: float = LOCK_S, max_wait: float = 30.0
               ) -> PredictionCache:  # fmt: skip
    """A PredictionCache as one worker process holds it (L1 off, so L2 is what is shared)."""
    return PredictionCache(client, l1_max_entries=0, l1_ttl=0, lock_seconds=lock_seconds,
                           max_wait=max_wait)  # fmt: skip


class Model:
    """A compute function that counts its calls and takes ``seconds`` (or until released)."""

    def __init__(self, seconds: float = 0.0, gate: threading.Event | None = None) -> None:
        self.seconds, self.gate = seconds, gate
        self.calls = 0
        self._lock = threading.Lock()

    def __call__(self) -> dict[str, Any]:
        with self._lock:
            self.calls += 1
            n = self.calls
        if self.gate is not None:
            assert self.gate.wait(30)
        time.sleep(self.seconds)
        return {"outputs": {"answer": "42"}, "call": n}


def run_all(fns: list[Callable[[], Any]]) -> list[Any]:
    """Run the callables at once, each on its own thread; their results (or exceptions)."""

    def safe(fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001  # the test inspects it
            return exc

    with ThreadPoolExecutor(len(fns)) as pool:
        return list(pool.map(safe, fns))


def new_key() -> str:
    return f"test-coalescing-{uuid.uuid4().hex}"


def test_leader_lock_is_renewed_past_its_ttl_while_it_computes(client: redis.Redis) -> None:
    leader, follower = make_cache(client), make_cache(client)
    key, model = new_key(), Model(seconds=4 * LOCK_S)
    out: list[Any] = []
    lead = threading.Thread(target=lambda: out.append(leader.get_or_compute(key, 60, "j1", model)))
    lead.start()
    poll(lambda: client.exists(LOCK_PREFIX + key), timeout=5, interval=0.005)
    token = client.get(LOCK_PREFIX + key)
    assert token is not None and token.startswith("j1:")
    assert leader.renewer.held() == {LOCK_PREFIX + key: token}
    # Sampled through the whole call: the lock never lapses, and stays the leader's.
    samples = []
    while lead.is_alive():
        samples.append(client.get(LOCK_PREFIX + key))
        time.sleep(0.02)
    lead.join()
    assert len(samples) > 20
    assert set(samples[:-5]) == {token}, samples  # the last samples may see it released
    assert out[0][1] == "computed" and model.calls == 1
    assert not client.exists(LOCK_PREFIX + key)  # released with the stored entry
    assert leader.renewer.held() == {}
    assert follower.get_or_compute(key, 60, "j2", Model()) == (out[0][0], "l2")
    leader.close()


def test_renewal_extends_only_the_locks_that_are_still_ours(client: redis.Redis) -> None:
    renewer = LockRenewer(client, lock_seconds=30, max_hold=60)  # rounds by hand here
    ours, taken = LOCK_PREFIX + new_key(), LOCK_PREFIX + new_key()
    client.set(ours, "a:1", px=1000)
    client.set(taken, "b:1", px=1000)
    renewer.hold(ours, "a:1")
    renewer.hold(taken, "b:1")
    client.set(taken, "someone-else", px=1000)  # ours lapsed and another caller took it
    assert renewer.renew_once() == 1  # one round trip for both
    assert client.pttl(ours) > 25_000  # extended to the full 30 s
    assert client.get(taken) == "someone-else" and client.pttl(taken) <= 1000  # untouched
    assert renewer.held() == {ours: "a:1"}
    renewer.close()


def test_thirty_followers_of_a_slow_leader_make_no_call(client: redis.Redis) -> None:
    # The case at unit level: each caller its own process-like cache.
    caches = [make_cache(client) for _ in range(30)]
    key, model = new_key(), Model(seconds=3 * LOCK_S)
    results = run_all([lambda c=c, i=i: c.get_or_compute(key, 60, f"j{i}", model)
                       for i, c in enumerate(caches)])  # fmt: skip
    assert model.calls == 1
    assert sorted(src for _, src in results).count("computed") == 1
    assert {r[0]["call"] for r in results} == {1}
    for c in caches:
        c.close()


def test_lock_lapses_when_the_leader_stops_renewing_and_one_follower_takes_over(
    client: redis.Redis,
) -> None:
    leader = make_cache(client)
    key, gate = new_key(), threading.Event()
    hung = Model(gate=gate)
    lead = threading.Thread(target=lambda: leader.get_or_compute(key, 60, "dead", hung))
    lead.start()
    poll(lambda: leader.renewer.held(), timeout=5, interval=0.005)
    time.sleep(2 * LOCK_S)  # renewed meanwhile
    assert client.exists(LOCK_PREFIX + key)
    # The leader's process "dies": nothing renews its lock any more.
    leader.close()
    stopped = time.monotonic()
    followers = [make_cache(client) for _ in range(10)]
    model = Model(seconds=0.5)
    results = run_all([lambda c=c, i=i: c.get_or_compute(key, 60, f"f{i}", model)
                       for i, c in enumerate(followers)])  # fmt: skip
    assert time.monotonic() - stopped < LOCK_S + 0.5 + 1.5
    assert model.calls == 1, "exactly one follower takes over"
    assert [src for _, src in results].count("computed") == 1
    assert all(r[0]["call"] == 1 for r in results)
    gate.set()
    lead.join(10)
    for c in followers:
        c.close()


def test_a_failing_leader_frees_the_lock_at_once(client: redis.Redis) -> None:
    key = new_key()

    def fail() -> dict[str, Any]:
        time.sleep(0.5)
        raise RuntimeError("provider said no")

    leader = make_cache(client, lock_seconds=30)  # only the release can free it this soon
    lead = threading.Thread(target=lambda: run_all([lambda: leader.get_or_compute(
        key, 60, "lead", fail)]))  # fmt: skip
    lead.start()
    poll(lambda: client.exists(LOCK_PREFIX + key), timeout=5, interval=0.005)
    followers = [make_cache(client, lock_seconds=30) for _ in range(10)]
    model = Model(seconds=0.3)
    t0 = time.monotonic()
    results = run_all([lambda c=c, i=i: c.get_or_compute(key, 60, f"f{i}", model)
                       for i, c in enumerate(followers)])  # fmt: skip
    lead.join()
    assert time.monotonic() - t0 < 5
    assert model.calls == 1 and all(r[0]["call"] == 1 for r in results)


def test_a_stuck_leader_is_renewed_only_up_to_max_wait(client: redis.Redis) -> None:
    key, gate = new_key(), threading.Event()
    leader = make_cache(client, max_wait=2.0)
    stuck = Model(gate=gate)
    lead = threading.Thread(target=lambda: leader.get_or_compute(key, 60, "stuck", stuck))
    lead.start()
    poll(lambda: leader.renewer.held(), timeout=5, interval=0.005)
    started = time.monotonic()
    patient = [make_cache(client, max_wait=10.0) for _ in range(5)]
    impatient = make_cache(client, max_wait=0.5)
    model = Model(seconds=0.2)
    results = run_all(
        [lambda: impatient.get_or_compute(key, 60, "short", model)]
        + [lambda c=c: c.get_or_compute(key, 60, "patient", model) for c in patient]
    )
    waited = time.monotonic() - started
    # A follower waits at most its max_wait, then fails as a timed-out job (no unlocked call).
    assert isinstance(results[0], JobTimeoutError), results[0]
    # The stuck leader's lock lapsed after max_wait (+ one TTL): exactly one follower took over.
    assert model.calls == 1
    assert all(r[0]["call"] == 1 for r in results[1:])
    assert 1.9 <= waited < 2.0 + LOCK_S + 1.5, waited
    gate.set()
    lead.join(10)
    leader.close()


def test_no_lock_service_means_compute_not_no_answer() -> None:
    # Nothing listens there; no client-side retries, so the test is quick.
    dead = redis.Redis(port=free_port(), socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0))
    cache = make_cache(dead)
    model = Model()
    entry, source = cache.get_or_compute(new_key(), 60, "j", model)
    assert source == "computed" and entry["outputs"] == {"answer": "42"} and model.calls == 1


# --- fleet level: real workers, the mock LLM's own counter ----------------------------------

SLOW_MODEL_MS = 5000
LOCK = {"DSPY_FLEET_COALESCE_LOCK_SECONDS": "2"}


@pytest.fixture
def fleet(mock_llm: MockLLM, tmp_path: Path) -> Iterator[OwnStack]:
    """A stack of the test's own (Redis, then workers and API as the test starts them)
    on the session's mock LLM, made slow: every call outlasts the 2 s lock TTL."""
    mock_llm.reset()
    # 30 requests hold waits at once: threads enough that the API's wait cap holds them.
    stack = OwnStack(tmp_path, env={**TEST_ENV, **LOCK, "DSPY_FLEET_API_THREADS": "48"})
    stack.use_mock_llm(mock_llm)
    stack.start_redis()
    mock_llm.set_faults(latency_ms=SLOW_MODEL_MS)
    yield stack
    stack.stop()
    mock_llm.reset()


def test_thirty_identical_slow_requests_make_one_provider_call(fleet: OwnStack) -> None:
    with fleet.together():
        fleet.start_worker()
        api = fleet.start_api()
    body = {"input": f"{uuid.uuid4().hex[:8]}: What is 9+9?", "wait": 40, "use_cache": True}

    def submit() -> dict[str, Any]:
        with httpx.Client(base_url=api.url, timeout=60) as http:
            return http.post("/v1/predict", json=body).json()

    results = run_all([submit] * 30)
    assert all(r["status"] == "succeeded" for r in results), results
    assert {r["outputs"]["answer"] for r in results} == {"18"}
    # 28 on the old code: every follower called the model once its 2 s wait ran out.
    assert fleet.mock.stats()["chat_completions"] == 1


def test_a_killed_leader_is_replaced_by_exactly_one_follower(fleet: OwnStack) -> None:
    # The leader runs on a worker of its own (interactive lane), the followers on another.
    with fleet.together():
        leader_worker = fleet.start_worker(DSPY_FLEET_QUEUES="interactive")
        fleet.start_worker(DSPY_FLEET_QUEUES="batch")
        api = fleet.start_api()
    http = httpx.Client(base_url=api.url, timeout=30)
    question = f"{uuid.uuid4().hex[:8]}: What is 6+6?"
    lead = http.post("/v1/predict", json={"input": question, "priority": "interactive"})
    assert lead.status_code == 202
    poll(lambda: fleet.mock.stats()["in_flight"] == 1, timeout=20)
    ids = [
        http.post("/v1/predict", json={"input": question, "priority": "batch"}).json()["id"]
        for _ in range(10)
    ]

    def status(job_id: str) -> str:
        return str(http.get(f"/v1/predictions/{job_id}").json()["status"])

    poll(lambda: all(status(i) == "running" for i in ids), timeout=10)
    time.sleep(0.5)  # the followers are in their wait loop now
    assert fleet.mock.stats()["chat_completions"] == 1
    leader_worker.child.signal(signal.SIGKILL)  # mid-call, renewer thread and all
    leader_worker.child.proc.wait(10)

    def ended() -> list[dict[str, Any]] | None:
        bodies = [http.get(f"/v1/predictions/{i}").json() for i in ids]
        return bodies if all(b["status"] in ("succeeded", "failed") for b in bodies) else None

    bodies = poll(ended, timeout=30, interval=0.2)
    assert all(b["status"] == "succeeded" for b in bodies), bodies
    assert {b["outputs"]["answer"] for b in bodies} == {"12"}
    # The dead leader's call plus one follower's; not one per follower.
    assert fleet.mock.stats()["chat_completions"] == 2
    http.close()
