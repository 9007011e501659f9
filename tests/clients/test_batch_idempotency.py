"""Issue 13, fault class 6: a batch whose publish or records fail part-way is never a 500, says
which items were accepted, and a retry with the same idempotency key bills nothing twice.

The faults are real Redis refusals on the fleet's own redis-server: an ACL that denies LPUSH
(the job records are written, kombu's pipelined publish fails with BatchPublishError), and a
``maxmemory`` just above what Redis holds (the first job records fit, the rest are refused
with OOM, and so are their publishes). The worker's recovery sweep publishes recorded jobs
whose message never reached the queue.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
import redis

from dspy_fleet.broker.producer import ProducerError, batch_id_for, item_job_id
from dspy_fleet.client import FleetClient
from dspy_fleet.contract import DEFAULT_TENANT, TERMINAL_STATUSES
from dspy_fleet.errors import ClientError, IdempotencyKeyReusedError
from tests.clients.conftest import Fleet
from tests.conftest import poll

N = 200
# Above Redis's use when the batch arrives: the batch's own metadata (~30 KB for N items)
# and some of the ~1.5 KB job records fit, the rest are refused (measured: ~3 KB per job
# with its queued message; 108 of 200 accepted over HTTP, 129 through submit_many).
HTTP_BUDGET = 160_000
DIRECT_BUDGET = 160_000


@pytest.fixture(scope="module")
def recovering_worker(fleet: Fleet) -> Iterator[Fleet]:
    """The package's stack with a worker whose due sweep republishes lost jobs after 1 s (the
    package's API records its jobs for a first look after 1 s too). One for the module: each
    test waits until all its jobs ended, and their questions are unique (no cache hits)."""
    fleet.start_worker(
        "worker-recovering",
        DSPY_FLEET_RECOVERY_AFTER_SECONDS="1",
        DSPY_FLEET_HEARTBEAT_SECONDS="1",
    )
    yield fleet
    fleet.stop_worker()  # later modules get the package's ordinary worker


@pytest.fixture
def recovering(recovering_worker: Fleet) -> Fleet:
    """That stack with the mock LLM's counters at zero (each test counts its own calls)."""
    recovering_worker.mock.reset()
    return recovering_worker


def items(tag: str, n: int = N) -> list[dict[str, Any]]:
    """Distinct questions (no cache hit can hide a second provider call)."""
    return [{"custom_id": f"item-{i}", "input": f"Batch {tag}: what is {i}+1?"} for i in range(n)]


@contextmanager
def lpush_denied(r: redis.Redis) -> Iterator[None]:
    """Redis refuses LPUSH (every kombu publish) but still takes the job records."""
    r.execute_command("ACL", "SETUSER", "default", "-lpush")
    try:
        yield
    finally:
        r.execute_command("ACL", "SETUSER", "default", "+@all")


@contextmanager
def redis_full_after(r: redis.Redis, budget: int) -> Iterator[None]:
    """Redis at maxmemory (noeviction) once it holds ``budget`` more bytes than now."""
    r.config_set("maxmemory-policy", "noeviction")
    r.config_set("maxmemory", int(r.info("memory")["used_memory"]) + budget)
    try:
        yield
    finally:
        r.config_set("maxmemory", 0)


def costs_requests(http: httpx.Client) -> int:
    """Jobs billed so far (the /costs ledger of the default tenant)."""
    by_tenant = http.get("/costs").json()["by_tenant"]
    return int(by_tenant.get(DEFAULT_TENANT, {}).get("requests", 0))


def calls(fleet: Fleet) -> int:
    """Provider calls, from the mock LLM's own counter."""
    return int(fleet.mock.stats()["chat_completions"])


def wait_ended(fleet: Fleet, job_ids: list[str], timeout: float = 90) -> list[dict[str, Any]]:
    """The job records once every one ended."""
    with fleet.producer() as producer:
        jobs = producer.wait_many(job_ids, timeout=timeout)
    assert all(j and j["status"] in TERMINAL_STATUSES for j in jobs), [
        (j or {}).get("status") for j in jobs
    ]
    return [j for j in jobs if j]


def wait_batch(http: httpx.Client, batch_id: str, timeout: float = 90) -> dict[str, Any]:
    """The batch once nothing in it is pending."""
    return poll(
        lambda: (b := http.get(f"/v1/batches/{batch_id}").json())["counts"]["pending"] == 0 and b,
        timeout=timeout,
        interval=0.3,
    )


def test_refused_publish_is_202_and_every_item_runs_and_bills_once(recovering: Fleet) -> None:
    """Records written, publish refused (kombu BatchPublishError): 202 with the batch id; the
    recovery sweep runs every item once; a retry with the key bills nothing again."""
    fleet, batch, key = recovering, items(uuid.uuid4().hex[:8]), f"key-{uuid.uuid4()}"
    r = fleet.redis()
    with fleet.http() as http:
        billed = costs_requests(http)
        with lpush_denied(r):
            resp = http.post("/v1/batches", json=batch, headers={"Idempotency-Key": key})
        assert resp.status_code == 202, resp.text  # the old code answered 500
        created = resp.json()
        assert created["id"].startswith("batch_")
        assert created["accepted"] == [i["custom_id"] for i in batch]
        assert created["rejected"] == [] and created["errors"] == []
        done = wait_batch(http, created["id"])
        assert done["counts"]["succeeded"] == N, done
        assert calls(fleet) == N
        assert costs_requests(http) - billed == N

        again = http.post("/v1/batches", json=batch, headers={"Idempotency-Key": key})
        assert again.status_code == 202, again.text
        assert again.json()["id"] == created["id"]
        assert again.json()["counts"]["succeeded"] == N
        assert len(again.json()["accepted"]) == N and again.json()["rejected"] == []
        lines = http.get(f"/v1/batches/{created['id']}/results").text.splitlines()
    assert len(lines) == N  # the same batch: its items were not added a second time
    assert calls(fleet) == N
    with fleet.http() as http:
        assert costs_requests(http) - billed == N


def test_records_refused_part_way_then_retry_with_key_adds_only_the_missing(
    recovering: Fleet,
) -> None:
    """Redis full part-way through the records: 202 naming the batch and exactly which items
    were accepted; those run once; the retry (through the SDK) adds the rest, nothing twice."""
    fleet, batch, key = recovering, items(uuid.uuid4().hex[:8]), f"key-{uuid.uuid4()}"
    r = fleet.redis()
    with fleet.http() as http:
        billed = costs_requests(http)
        with redis_full_after(r, HTTP_BUDGET):
            resp = http.post("/v1/batches", json=batch, headers={"Idempotency-Key": key})
        assert resp.status_code == 202, resp.text  # the old code answered 503 without an id
        created = resp.json()
        accepted, rejected = created["accepted"], created["rejected"]
        assert 0 < len(accepted) < N, (len(accepted), len(rejected))
        print(f"\nHTTP: {len(accepted)} accepted, {len(rejected)} rejected")
        assert accepted + rejected == [i["custom_id"] for i in batch]
        assert {e["custom_id"] for e in created["errors"]} == set(rejected)
        assert {e["code"] for e in created["errors"]} == {"redis_unavailable"}

        # The accepted items (their publish was refused too) end through the recovery sweep;
        # the rejected ones never run.
        done = wait_batch(http, created["id"])
        assert done["counts"]["succeeded"] == len(accepted), done
        assert done["counts"]["failed"] == len(rejected)
        assert calls(fleet) == len(accepted)
        assert costs_requests(http) - billed == len(accepted)

        with FleetClient(fleet.api.url) as client:
            retried = client.batch(batch, idempotency_key=key)
            assert retried.id == created["id"]
            assert retried.accepted == [i["custom_id"] for i in batch]
            assert retried.rejected == []
            final = client.wait_batch(retried.id, timeout=90)
        assert final.counts.succeeded == N, final
        lines = http.get(f"/v1/batches/{created['id']}/results").text.splitlines()
        assert len(lines) == N
        assert calls(fleet) == N
        assert costs_requests(http) - billed == N


def test_submit_many_refused_part_way_then_retry_with_key_adds_only_the_missing(
    recovering: Fleet,
) -> None:
    """The same through the direct producer: ProducerError lists accepted and rejected job ids;
    the retry with the key returns the same ids and bills only what was missing."""
    fleet, batch, key = recovering, items(uuid.uuid4().hex[:8]), f"key-{uuid.uuid4()}"
    r = fleet.redis()
    with fleet.http() as http:
        billed = costs_requests(http)
    with fleet.producer() as producer:
        with redis_full_after(r, DIRECT_BUDGET), pytest.raises(ProducerError) as caught:
            producer.submit_many(batch, idempotency_key=key)
        err = caught.value
        assert err.batch_id and err.unknown == []
        assert 0 < len(err.accepted) < N, (len(err.accepted), len(err.rejected))
        print(f"\nsubmit_many: {len(err.accepted)} accepted, {len(err.rejected)} rejected")
        assert len(err.accepted) + len(err.rejected) == N
        assert not set(err.accepted) & set(err.rejected)
        wait_ended(fleet, err.accepted)
        assert producer.get_many(err.rejected) == [None] * len(err.rejected)
        assert calls(fleet) == len(err.accepted)

        ids = producer.submit_many(batch, idempotency_key=key)
        assert ids == err.accepted + err.rejected  # the same jobs, in the items' order
        jobs = wait_ended(fleet, ids)
    assert [j["status"] for j in jobs] == ["succeeded"] * N
    assert calls(fleet) == N
    with fleet.http() as http:
        assert costs_requests(http) - billed == N


def test_same_key_with_other_items_is_refused(running: Fleet) -> None:
    """A key names one set of items: another set under it is 422 idempotency_key_reused
    (HTTP and submit_many alike), and nothing of the other set is recorded."""
    tag, key = uuid.uuid4().hex[:8], f"key-{uuid.uuid4()}"
    first = items(tag, 3)
    other = [{**i, "custom_id": f"other-{n}"} for n, i in enumerate(items(tag + "-2", 3))]

    def recorded(idem: str, batch: list[dict[str, Any]]) -> list[bool]:
        batch_id = batch_id_for(DEFAULT_TENANT, idem)
        ids = [item_job_id(DEFAULT_TENANT, batch_id, i["custom_id"]) for i in batch]
        with running.producer() as producer:
            return [j is not None for j in producer.get_many(ids)]

    with running.http() as http:
        assert http.post("/v1/batches", json=first, headers={"Idempotency-Key": key}).is_success
        resp = http.post("/v1/batches", json=other, headers={"Idempotency-Key": key})
        assert resp.status_code == 422, resp.text
        assert resp.json()["error"]["code"] == "idempotency_key_reused"
        # The same items in another order are another submission too.
        resp = http.post("/v1/batches", json=first[::-1], headers={"Idempotency-Key": key})
        assert resp.status_code == 422, resp.text
        # NDJSON carries the key the same way (the SDK sends NDJSON).
        with FleetClient(running.api.url) as client:
            with pytest.raises(ClientError) as caught:
                client.batch(other, idempotency_key=key)
            assert caught.value.code == "idempotency_key_reused" and caught.value.status == 422
    assert recorded(key, first) == [True] * 3
    assert recorded(key, other) == [False] * 3
    direct = f"direct-{uuid.uuid4()}"
    with running.producer() as producer:
        producer.submit_many(first, idempotency_key=direct)
        with pytest.raises(IdempotencyKeyReusedError):
            producer.submit_many(other, idempotency_key=direct)
    assert recorded(direct, first) == [True] * 3
    assert recorded(direct, other) == [False] * 3
