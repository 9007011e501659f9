"""Redis refusing writes or hanging is weather, not death (issue 13, fault classes 5 and 7).

A Redis at ``maxmemory`` (noeviction), a replica turned read-only, a flushed script cache
and a Redis that stops answering: no worker exits, no accepted job is lost, and the API
answers 503 naming the cause within a bounded time, never 500 and never a hang.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable

import httpx
import pytest
import redis

from dspy_fleet.devtools.procs import free_port
from dspy_fleet.devtools.redis import RedisServer
from tests.chaos.conftest import ChaosStack, assert_billed_once

# Run alone by `make test`: answers within the Redis timeout's bound are asserted.
pytestmark = pytest.mark.serial

# The settings' default DSPY_FLEET_REDIS_TIMEOUT_SECONDS: each Redis call of a request
# gives up after it, and a submission makes at most two before it fails.
REDIS_TIMEOUT = 2.0
# Margin for a loaded 2-core machine: the bound is a correctness bound, not a benchmark.
MARGIN = 1.5


def _submit(client: httpx.Client, n: int, tag: str) -> httpx.Response:
    return client.post("/v1/predict", json={"input": f"{tag} {n}: What is {n}+3?",
                                            "use_cache": False})  # fmt: skip


def _burst(client: httpx.Client, count: int, tag: str) -> list[str]:
    ids = []
    for n in range(count):
        resp = _submit(client, n, tag)
        assert resp.status_code == 202, resp.text
        ids.append(resp.json()["id"])
    return ids


def _weather(
    chaos: ChaosStack, tag: str, break_redis: Callable[[redis.Redis], None],
    heal_redis: Callable[[redis.Redis], None], code: str,
) -> None:  # fmt: skip
    """Jobs running when Redis starts refusing writes: the worker lives, the API answers 503
    ``code`` meanwhile, and every accepted job succeeds once Redis heals, billed once."""
    chaos.mock.set_faults(latency_ms=400)
    with chaos.together():
        worker = chaos.start_worker()
        api = chaos.start_api()
    r = chaos.redis
    with httpx.Client(base_url=api.url, timeout=30) as client:
        accepted = _burst(client, 30, tag)
        break_redis(r)
        refusals: Counter[tuple[int, str]] = Counter()
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:
            resp = _submit(client, sum(refusals.values()), f"{tag}-refused")
            if resp.status_code == 202:
                accepted.append(resp.json()["id"])  # accepted is accepted: it must not be lost
            refusals[(resp.status_code, resp.json().get("error", {}).get("code", ""))] += 1
            time.sleep(0.2)
        # The jobs that were running hit the refusal and handed their messages back.
        assert worker.alive(), f"the worker died: {worker.log_path.read_text()[-3000:]}"
        heal_redis(r)
        final = chaos.wait_all(accepted, timeout=90)
        after = _burst(client, 5, f"{tag}-after")
        final_after = chaos.wait_all(after, timeout=30)
    # Nothing but 503 naming the cause while Redis refused (a write that found room, as
    # memory was freed by acks, was accepted and is checked below like any other).
    assert refusals[(503, code)] > 0 and set(refusals) <= {(503, code), (202, "")}, refusals
    lost = {j: s for j, s in {**final, **final_after}.items() if s != "succeeded"}
    assert not lost, f"{len(lost)} accepted jobs did not succeed: {Counter(lost.values())}"
    assert worker.alive() and worker.pid == chaos.workers[0].pid
    assert "Unrecoverable error" not in worker.log_path.read_text()
    ids = accepted + after
    assert_billed_once(chaos.records(ids), chaos.costs())


def test_redis_at_maxmemory_kills_no_worker_and_loses_no_job(chaos: ChaosStack) -> None:
    def fill(r: redis.Redis) -> None:
        used = int(r.info("memory")["used_memory"])
        r.config_set("maxmemory-policy", "noeviction")
        r.config_set("maxmemory", str(used // 2))  # well below: writes stay refused

    _weather(chaos, "oom", fill, lambda r: r.config_set("maxmemory", "0"), "redis_unavailable")


def test_redis_turned_read_only_kills_no_worker_and_loses_no_job(chaos: ChaosStack) -> None:
    # A replica of a master that does not answer: read-only, and it keeps its data.
    nobody = free_port()
    _weather(
        chaos, "readonly",
        lambda r: r.execute_command("REPLICAOF", "127.0.0.1", str(nobody)),
        lambda r: r.execute_command("REPLICAOF", "NO", "ONE"),
        "redis_unavailable",
    )  # fmt: skip


def test_flushed_script_cache_mid_burst_fails_nothing(chaos: ChaosStack) -> None:
    chaos.mock.set_faults(latency_ms=100)
    with chaos.together():
        worker = chaos.start_worker()
        api = chaos.start_api()
    r = chaos.redis
    codes: Counter[int] = Counter()
    accepted: list[str] = []
    with httpx.Client(base_url=api.url, timeout=30) as client:
        for n in range(120):
            if n % 10 == 5:
                r.script_flush()  # every Lua script we run must load itself again
            resp = _submit(client, n, "noscript")
            codes[resp.status_code] += 1
            if resp.status_code == 202:
                accepted.append(resp.json()["id"])
    final = chaos.wait_all(accepted, timeout=60)
    assert codes == {202: 120}, codes
    assert Counter(final.values()) == {"succeeded": 120}
    assert worker.alive() and "Unrecoverable error" not in worker.log_path.read_text()
    assert_billed_once(chaos.records(accepted), chaos.costs())


def test_hung_redis_answers_503_within_the_bound(chaos: ChaosStack) -> None:
    """CLIENT PAUSE 25 s: a submission answers within its bound, then the fleet serves again.

    The bound: the job store's client gives up after DSPY_FLEET_REDIS_TIMEOUT_SECONDS per
    call and a submission makes at most two calls before failing (the program catalog,
    then the record): 2 × 2 s. With the broker alone hung the job is recorded, the publish
    gives up within 4 × 2 s (2 attempts, each a connect and a read timeout) and the answer
    is 202: the recovery sweep publishes the job.
    """
    broker = RedisServer(log_path=chaos.dir / "broker.log").start()
    try:
        chaos.env["DSPY_FLEET_BROKER_URL"] = broker.url
        with chaos.together():
            worker = chaos.start_worker()
            api = chaos.start_api()
        store, queue = chaos.redis, redis.Redis.from_url(broker.url)
        with httpx.Client(base_url=api.url, timeout=60) as client:
            before = _burst(client, 3, "before-hang")
            # The broker hangs: the publish must give up (it used to wait the 25 s out).
            queue.execute_command("CLIENT", "PAUSE", "25000", "ALL")
            hung_until = time.monotonic() + 25
            t0 = time.monotonic()
            resp = _submit(client, 0, "broker-hung")
            took_publish = time.monotonic() - t0
            assert took_publish <= 4 * REDIS_TIMEOUT + MARGIN, took_publish
            assert resp.status_code == 202, resp.text
            kept = resp.json()["id"]
            # Now the job store hangs too: 503 redis_unavailable, not a hung request.
            left_ms = int((hung_until - time.monotonic()) * 1000)
            store.execute_command("CLIENT", "PAUSE", str(left_ms), "ALL")
            t0 = time.monotonic()
            resp = _submit(client, 1, "store-hung")
            took_store = time.monotonic() - t0
            assert resp.status_code == 503, resp.text
            assert resp.json()["error"]["code"] == "redis_unavailable"
            # A paused Redis serves no command, not even CLIENT UNPAUSE: wait the pause out.
            time.sleep(max(0.0, hung_until - time.monotonic()) + 0.5)
            after = _burst(client, 3, "after-hang")
            final = chaos.wait_all([*before, kept, *after], timeout=60)
        assert took_store <= 2 * REDIS_TIMEOUT + MARGIN, took_store
        assert Counter(final.values()) == {"succeeded": 7}, final
        assert worker.alive()
    finally:
        broker.stop()
