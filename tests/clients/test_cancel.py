"""Cancel: a queued job becomes cancelled (terminal, unbilled) and the worker skips its message
when it is delivered later; a finished job cannot be cancelled. Runs with the worker stopped so
that jobs stay queued, then starts one to deliver the cancelled messages."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from dspy_fleet.broker.producer import Producer
from tests.clients.conftest import Fleet
from tests.conftest import poll


@pytest.fixture(scope="module")
def stopped(fleet: Fleet) -> Iterator[Fleet]:
    """The stack with no worker: every job stays queued."""
    fleet.stop_worker()
    fleet.mock.reset()
    r = fleet.redis()
    r.delete("interactive", "batch")
    yield fleet


CANCELLED: list[str] = []


def test_same_request_id_is_one_queued_job(stopped: Fleet) -> None:
    with Producer(redis_url=stopped.redis_url) as producer:
        first = producer.submit({"input": "once?", "request_id": "dedupe-me"})
        again = producer.submit_many(
            [{"input": "once?", "request_id": "dedupe-me"}], priority="interactive"
        )
        assert again == [first]
        assert producer.redis.llen("interactive") == 1
        assert producer.get(first)["status"] == "queued"
    CANCELLED.append(first)
    with stopped.http() as http:
        assert http.delete(f"/v1/predictions/{first}").json()["status"] == "cancelled"


def test_delete_cancels_a_queued_prediction(stopped: Fleet) -> None:
    with stopped.http() as http:
        queued = http.post("/v1/predict", json={"input": "Cancel me?"})
        assert queued.status_code == 202
        job_id = queued.json()["id"]
        resp = http.delete(f"/v1/predictions/{job_id}")
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert body["status"] == "cancelled"
        assert body["error"]["code"] == "cancelled"
        assert "cost" not in body  # billed nothing
        assert http.get(f"/v1/predictions/{job_id}").json()["status"] == "cancelled"
        # Idempotent: cancelling a cancelled job answers the same.
        assert http.delete(f"/v1/predictions/{job_id}").json()["status"] == "cancelled"
        missing = http.delete("/v1/predictions/no-such-job")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    CANCELLED.append(job_id)


def test_cancel_a_queued_batch(stopped: Fleet) -> None:
    items = [{"custom_id": f"c{i}", "input": f"Batch to cancel {i}?"} for i in range(20)]
    with stopped.http() as http:
        created = http.post("/v1/batches", json=items).json()
        assert created["status"] == "in_progress"
        resp = http.post(f"/v1/batches/{created['id']}/cancel")
        assert resp.status_code == 200
        batch = resp.json()
        assert batch["status"] == "cancelled"
        assert batch["counts"] == {
            "total": 20,
            "succeeded": 0,
            "failed": 0,
            "cancelled": 20,
            "pending": 0,
        }
        lines = http.get(created["results_url"]).text.splitlines()
        assert len(lines) == 20
        assert http.delete(f"/v1/batches/{created['id']}").json()["status"] == "cancelled"
        CANCELLED.extend(json.loads(line)["id"] for line in lines)


def test_worker_skips_cancelled_messages_and_finished_jobs_cannot_be_cancelled(
    stopped: Fleet,
) -> None:
    assert len(CANCELLED) == 22, "the earlier tests of this module queued and cancelled these"
    r = stopped.redis()
    assert r.llen("interactive") + r.llen("batch") == 22  # still queued, not yet delivered
    worker = stopped.start_worker()
    poll(
        lambda: r.llen("interactive") + r.llen("batch") == 0 and r.hlen("unacked") == 0, timeout=30
    )

    def skipped() -> set[str]:
        return {
            line.get("job_id")
            for line in worker.log_lines()
            if line.get("message") == "job already finished; not running it again"
        }

    poll(lambda: set(CANCELLED) <= skipped(), timeout=30)
    assert stopped.mock.stats()["chat_completions"] == 0, "a cancelled job reached the model"
    with stopped.http() as http:
        for job_id in CANCELLED:
            assert http.get(f"/v1/predictions/{job_id}").json()["status"] == "cancelled"
        done = http.post("/v1/predict", json={"input": "What is 3+3?", "wait": 30}).json()
        assert done["status"] == "succeeded"
        late = http.delete(f"/v1/predictions/{done['id']}")
        assert late.status_code == 409
        assert late.json()["error"]["code"] == "not_cancellable"
        assert late.json()["error"]["details"] == {"status": "succeeded"}
