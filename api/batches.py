"""Batches: many predictions submitted at once, tracked together (OpenAI Batch API style).

A batch is a Redis hash (its metadata) plus a list of its items in submission
order; each valid item is an ordinary job in the job store, so counts, status and
results are derived from the jobs themselves and can never drift from them.
Invalid items are kept in the list with their error. Never import dspy here.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

import redis
from flask import Flask, current_app

from api.settings import ApiSettings
from worker.celery_config import make_celery
from worker.contract import utcnow
from worker.jobs import TERMINAL, JobStore
from worker.producer import Publisher, read_jobs, result_line

KEY_PREFIX = "dspy_fleet:batch:"
# Items read per Redis pipeline when counting or streaming results.
READ_CHUNK = 500
STATUSES = ("in_progress", "completed", "failed", "cancelling", "cancelled")
# A job cancelled while still queued; running jobs are left to finish (see cancel_job).
CANCELLABLE = frozenset({"queued", "retrying"})


def new_batch_id() -> str:
    """A fresh batch id."""
    return "batch_" + uuid.uuid4().hex


def _items_key(batch_id: str) -> str:
    return f"{KEY_PREFIX}{batch_id}:items"


class BatchStore:
    """Batch metadata and item lists in Redis, next to the jobs they point at."""

    def __init__(self, client: redis.Redis, ttl_seconds: int) -> None:
        self.client = client
        self.ttl = ttl_seconds

    def create(
        self, batch_id: str, meta: dict[str, Any], entries: Sequence[dict[str, Any]]
    ) -> None:
        """Store a batch; ``entries`` are {index, custom_id, job_id} or {…, error}."""
        with self.client.pipeline(transaction=True) as pipe:
            pipe.hset(KEY_PREFIX + batch_id, mapping={k: str(v) for k, v in meta.items()})
            for start in range(0, len(entries), READ_CHUNK):
                chunk = entries[start : start + READ_CHUNK]
                pipe.rpush(_items_key(batch_id), *(json.dumps(e) for e in chunk))
            pipe.expire(KEY_PREFIX + batch_id, self.ttl)
            pipe.expire(_items_key(batch_id), self.ttl)
            pipe.execute()

    def meta(self, batch_id: str) -> dict[str, str] | None:
        """The batch's metadata, or None when unknown or expired."""
        raw = self.client.hgetall(KEY_PREFIX + batch_id)
        return raw or None

    def mark_cancelled(self, batch_id: str) -> None:
        """Record that cancelling was asked for (the first time only)."""
        self.client.hsetnx(KEY_PREFIX + batch_id, "cancelled_at", utcnow().isoformat())

    def entries(self, batch_id: str) -> Iterator[list[dict[str, Any]]]:
        """The batch's items in submission order, a chunk at a time."""
        start = 0
        while True:
            raw = self.client.lrange(_items_key(batch_id), start, start + READ_CHUNK - 1)
            if not raw:
                return
            yield [json.loads(r) for r in raw]
            start += READ_CHUNK

    def with_jobs(
        self, batch_id: str
    ) -> Iterator[list[tuple[dict[str, Any], dict[str, Any] | None]]]:
        """Each chunk of items paired with its job record (None for invalid or expired)."""
        for chunk in self.entries(batch_id):
            ids = [e["job_id"] for e in chunk if "job_id" in e]
            jobs = dict(zip(ids, read_jobs(self.client, ids), strict=True)) if ids else {}
            yield [(e, jobs.get(e.get("job_id", ""))) for e in chunk]


def item_status(entry: dict[str, Any], job: dict[str, Any] | None) -> str:
    """One item's status: a job status, or failed for invalid and expired items."""
    if "error" in entry or job is None:
        return "failed"
    return str(job.get("status") or "queued")


def item_line(entry: dict[str, Any], job: dict[str, Any] | None) -> dict[str, Any]:
    """The results line of one item."""
    if "error" in entry:
        return {
            "custom_id": entry.get("custom_id"),
            "index": entry["index"],
            "id": None,
            "status": "failed",
            "error": entry["error"],
        }
    if job is None:
        error = {"code": "expired", "message": "the job record expired", "details": {}}
        return {
            "custom_id": entry["custom_id"],
            "index": entry["index"],
            "id": entry["job_id"],
            "status": "failed",
            "error": error,
        }
    return result_line(entry["custom_id"], job, index=entry["index"])


def summarize(store: BatchStore, batch_id: str, meta: dict[str, str]) -> dict[str, Any]:
    """Counts and status of a batch, from its items' jobs."""
    counts = {"total": 0, "succeeded": 0, "failed": 0, "cancelled": 0, "pending": 0}
    for chunk in store.with_jobs(batch_id):
        for entry, job in chunk:
            status = item_status(entry, job)
            counts["total"] += 1
            counts[status if status in TERMINAL else "pending"] += 1
    cancelling = "cancelled_at" in meta
    if counts["pending"]:
        status = "cancelling" if cancelling else "in_progress"
    elif cancelling:
        status = "cancelled"
    elif int(meta.get("valid", "0")) == 0:
        status = "failed"  # nothing in it could run: every item was invalid
    else:
        status = "completed"
    return {"status": status, "counts": counts}


def cancel_job(client: redis.Redis, ttl_seconds: int, job_id: str) -> str:
    """Cancel a job that is still queued (or waiting to retry); returns its status afterwards
    ('cancelled', or the status that prevented it, or 'missing').

    The check and the terminal write are one WATCH/MULTI transaction: if a worker starts the
    job in between, the transaction aborts and the job is reported running instead. The
    terminal write is JobStore.finish (finished marker, wake-up, no bill), so when the job's
    message is delivered later the worker sees a finished job and does not run it.
    """
    key = JobStore.key(job_id)
    with client.pipeline(transaction=True) as pipe:
        while True:
            try:
                pipe.watch(key)
                status = pipe.hget(key, "status")
                if status is None:
                    return "missing"
                if status not in CANCELLABLE:
                    return str(status)
                pipe.multi()
                fields = {
                    "status": "cancelled",
                    "finished_at": utcnow(),
                    "error": {
                        "code": "cancelled",
                        "message": "cancelled by the client",
                        "details": {"previous_status": status},
                    },
                }
                JobStore(pipe, ttl_seconds).finish(job_id, fields)  # type: ignore[arg-type]
                (finished,) = pipe.execute()
                if finished:
                    return "cancelled"
                return str(client.hget(key, "status") or "missing")
            except redis.WatchError:
                continue  # the job changed under us (a worker took it): look again


class Batches:
    """The API's batch machinery: the store and a pipelined publisher of its jobs."""

    def __init__(self, settings: ApiSettings, client: redis.Redis) -> None:
        self.settings = settings
        self.store = BatchStore(client, settings.job_ttl_seconds)
        # Its own Celery app: the publisher turns off redis-py's retries so that kombu can
        # pipeline (the API's shared app keeps them for single publishes).
        self.publisher = Publisher(
            make_celery(settings, publisher=True), client, settings.job_ttl_seconds
        )


def init_app(app: Flask, settings: ApiSettings) -> None:
    """Attach the batch machinery (it shares the API's Redis client)."""
    client = app.extensions["dspy_fleet"].redis
    app.extensions["dspy_fleet_batches"] = Batches(settings, client)


def batches() -> Batches:
    """The batch machinery of the current app."""
    found: Batches = current_app.extensions["dspy_fleet_batches"]
    return found
