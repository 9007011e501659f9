"""Direct producers: submit_many pushes contract-v1 messages, pipelined, onto the batch lane."""

from __future__ import annotations

import time
from collections import Counter

import pytest
from pydantic import ValidationError

from tests.clients.conftest import Fleet

N = 2000


def test_submit_many_2000_direct_messages_all_succeed(running: Fleet) -> None:
    items = [{"input": f"Direct question number {i}?"} for i in range(N)]
    with running.producer() as producer:
        started = time.perf_counter()
        ids = producer.submit_many(items)
        push = time.perf_counter() - started
        jobs = producer.wait_many(ids, timeout=120)
        total = time.perf_counter() - started
    print(
        f"\nsubmit_many: {N} messages pushed in {push:.3f}s = {N / push:,.0f} msg/s; "
        f"all ended {total:.1f}s after the first push ({N / total:,.0f} jobs/s end to end)"
    )
    assert len(set(ids)) == N
    assert Counter(j["status"] if j else None for j in jobs) == {"succeeded": N}
    assert {j["queue"] for j in jobs if j} == {"batch"}
    # Read back the same way as HTTP jobs.
    with running.http() as http:
        body = http.get(f"/v1/predictions/{ids[10]}").json()
    assert body["status"] == "succeeded" and body["outputs"]["answer"]
    assert body["cost"]["input_tokens"] > 0


def test_invalid_items_are_refused_before_anything_is_pushed(fleet: Fleet) -> None:
    with fleet.producer() as producer:
        before = producer.redis.llen("batch")
        with pytest.raises(ValidationError):
            producer.submit_many([{"input": "fine"}, {"input": "x", "inputs": {"q": "both"}}])
        assert producer.redis.llen("batch") == before
