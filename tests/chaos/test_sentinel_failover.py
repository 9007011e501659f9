"""Redis Sentinel failover under load (issue 20): the master is SIGKILLed, a replica is
promoted, and the fleet follows it without a restart.

Topology: one master, two replicas, three Sentinels, every node a redis-server on loopback
with AOF on; data nodes and Sentinels have different passwords. The API and two workers use
``redis+sentinel://`` for the job store, the broker, the result backend and the cache, with
DSPY_FLEET_ACCEPT_MIN_REPLICAS=1: a 202 means a replica had the job (Redis WAIT), so the
kill -9 of a master with writes still in its replication buffer loses no accepted job.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from dspy_fleet.devtools.sentinel import SentinelTopology
from tests.chaos.conftest import FAST_REDELIVERY, ChaosStack, assert_billed_once, chaos_config
from tests.conftest import TEST_ENV, MockLLM

BATCH_ITEMS = 1000  # the jobs running or queued when the master dies
LLM_LATENCY_MS = 1000  # 2 workers × 64 threads: 1,000 jobs take at least ~8 s


@pytest.fixture
def topology(tmp_path: Path) -> Iterator[SentinelTopology]:
    """1 master + 2 replicas + 3 Sentinels, started and agreeing on the master."""
    topo = SentinelTopology(tmp_path / "sentinel").start()
    yield topo
    topo.stop()


@pytest.fixture
def fleet(topology: SentinelTopology, mock_llm: MockLLM, tmp_path: Path) -> Iterator[ChaosStack]:
    """An API and two workers on the Sentinel URL (every Redis role), WAIT for 1 replica."""
    mock_llm.reset()
    env = {
        **TEST_ENV,
        **FAST_REDELIVERY,
        "DSPY_FLEET_CONFIG": str(chaos_config(tmp_path / "chaos-fleet.yaml")),
        "DSPY_FLEET_SENTINEL_PASSWORD": topology.sentinel_password,
        "DSPY_FLEET_ACCEPT_MIN_REPLICAS": "1",
        "DSPY_FLEET_ACCEPT_REPLICA_TIMEOUT_MS": "1000",
    }
    stack = ChaosStack(tmp_path, env=env)
    stack.use_mock_llm(mock_llm)
    stack.use_redis(topology.url)  # DSPY_FLEET_REDIS_URL: store, broker, backend and cache
    with stack.together():
        stack.start_api()
        stack.start_workers(2)
    yield stack
    stack.stop()
    mock_llm.reset()


def test_master_killed_mid_run_no_accepted_job_lost(
    topology: SentinelTopology, fleet: ChaosStack
) -> None:
    api = fleet.api
    assert api is not None
    pids = {name: svc.child.pid for name, svc in fleet.services.items()}
    fleet.mock.set_faults(latency_ms=LLM_LATENCY_MS)
    items = [{"custom_id": f"b{i}", "input": f"b{i}: What is {i}+1?", "use_cache": False}
             for i in range(BATCH_ITEMS)]  # fmt: skip
    resp = httpx.post(api.url + "/v1/batches", json=items, timeout=60)
    assert resp.status_code == 202, resp.text
    batch_id = resp.json()["id"]
    assert len(resp.json()["accepted"]) == BATCH_ITEMS

    accepted: list[str] = []
    codes: Counter[int] = Counter()
    refusals: Counter[str] = Counter()
    answered: list[tuple[float, int]] = []  # (monotonic time, status) of each answer
    stop = threading.Event()

    def submit(n: int) -> None:  # the steady stream, before, during and after the switch
        with httpx.Client(base_url=api.url, timeout=30) as client:
            i = 0
            while not stop.is_set():
                i += 1
                try:
                    r = client.post("/v1/predict", json={"input": f"s{n}-{i}: What is {i}+2?",
                                                         "use_cache": False})  # fmt: skip
                except httpx.HTTPError:
                    codes[0] += 1  # never expected: the API itself stays up
                    continue
                codes[r.status_code] += 1
                answered.append((time.monotonic(), r.status_code))
                if r.status_code == 202:
                    accepted.append(r.json()["id"])
                else:
                    refusals[r.json()["error"]["code"]] += 1
                time.sleep(0.02)

    threads = [threading.Thread(target=submit, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    time.sleep(1.5)
    in_flight = Counter(fleet.statuses(fleet.all_job_ids()).values())
    before = len(accepted)
    killed_at = time.monotonic()
    old = topology.kill_master()  # kill -9: no AOF flush, no goodbye to the replicas
    new, promoted_after = topology.wait_promoted(old, timeout=30)
    time.sleep(5)  # the stream goes on against the new master
    stop.set()
    for t in threads:
        t.join()
    # The switch as clients saw it: from the kill to the first 202 after the last 503.
    last_503 = max((t for t, code in answered if code == 503), default=killed_at)
    back = min((t for t, code in answered if code == 202 and t > last_503), default=None)
    print(
        f"\nat the kill: {dict(in_flight)}; {before} stream jobs accepted before it, "
        f"{len(accepted)} in all; master {old} -> {new} promoted after {promoted_after:.1f} s; "
        f"last 503 at {last_503 - killed_at:.1f} s, next 202 at "
        f"{(back - killed_at) if back else float('nan'):.1f} s after the kill; "
        f"responses {dict(codes)}; refusals {dict(refusals)}"
    )
    # At the kill most of the batch was still waiting or running: the failover hit a fleet
    # with about 1,000 jobs in hand.
    assert in_flight["queued"] + in_flight["running"] >= BATCH_ITEMS * 0.8
    assert codes[0] == 0 and codes[500] == 0
    assert set(codes) <= {202, 503}, codes
    assert codes[503] > 0 and back is not None, "the switch was not seen, or never ended"
    assert set(refusals) <= {"redis_unavailable", "broker_unavailable", "replication_unconfirmed"}

    # Every item of the batch (202 before the kill) and every 202 of the stream succeeded.
    _wait_batch_ended(api.url, batch_id, timeout=120)
    lines = _results(api.url, batch_id)
    assert len(lines) == BATCH_ITEMS
    assert Counter(line["status"] for line in lines) == {"succeeded": BATCH_ITEMS}
    final = fleet.wait_all(accepted, timeout=60)
    lost = {j: s for j, s in final.items() if s != "succeeded"}
    assert not lost, f"{len(lost)} accepted jobs did not succeed: {Counter(lost.values())}"
    batch_ids = [str(line["id"]) for line in lines]
    # No process restarted: the same pids, all alive.
    for name, svc in fleet.services.items():
        assert svc.child.pid == pids[name] and svc.child.alive(), name
    assert httpx.get(api.url + "/ready", timeout=10).status_code == 200
    # Billed once: the ledger equals the per-job cost records of every job Redis holds (a
    # submission answered 503 after its record was written may exist and run too).
    recorded = fleet.all_job_ids()
    assert set(batch_ids) | set(accepted) <= set(recorded)
    assert all(s == "succeeded" for s in fleet.wait_all(recorded, timeout=60).values())
    assert_billed_once(fleet.records(recorded), fleet.costs())
    calls = int(fleet.mock.stats()["chat_completions"])
    print(
        f"all {BATCH_ITEMS + len(final)} accepted jobs succeeded, billed once; {len(recorded)} "
        f"recorded; provider calls {calls}; 503s {codes[503]}; no process restarted"
    )


def _wait_batch_ended(api_url: str, batch_id: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        counts = httpx.get(f"{api_url}/v1/batches/{batch_id}", timeout=10).json()["counts"]
        if counts["pending"] == 0:
            return
        assert time.monotonic() < deadline, counts
        time.sleep(0.5)


def _results(api_url: str, batch_id: str) -> list[dict[str, object]]:
    resp = httpx.get(f"{api_url}/v1/batches/{batch_id}/results", timeout=30)
    assert resp.status_code == 200, resp.text
    return [json.loads(line) for line in resp.text.splitlines() if line]
