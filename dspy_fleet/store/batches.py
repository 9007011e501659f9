"""Batches in Redis: a metadata hash plus the list of its items in submission order.

Each valid item is an ordinary job in the job store, so counts, status and results are
derived from the jobs themselves and can never drift from them. Invalid items are kept in
the list with their error. The API (api/batches.py) and the worker's webhook delivery
(worker/webhooks.py) read batches through this module. Never import flask or dspy here.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from typing import Any, cast

import redis

from dspy_fleet.broker.producer import read_jobs, result_line
from dspy_fleet.contract import TERMINAL_STATUSES, utcnow
from dspy_fleet.store.jobs import BATCH_PREFIX, BATCH_WAKE_PREFIX, WAKE_MARGIN_SECONDS
from dspy_fleet.store.jobs import KEY_PREFIX as JOB_PREFIX

KEY_PREFIX = BATCH_PREFIX
# Items read per Redis pipeline when counting or streaming results.
READ_CHUNK = 500


def _items_key(batch_id: str) -> str:
    return f"{KEY_PREFIX}{batch_id}:items"


class BatchStore:
    """Batch metadata and item lists in Redis, next to the jobs they point at."""

    def __init__(self, client: redis.Redis, ttl_seconds: int) -> None:
        self.client = client
        self.ttl = ttl_seconds

    def create(
        self, batch_id: str, meta: dict[str, Any], entries: Sequence[dict[str, Any]]
    ) -> bool:
        """Store a batch unless it exists (a retry with its idempotency key): False then, and
        the stored one is kept. ``entries`` are {index, custom_id, job_id} or {…, error}."""
        key = KEY_PREFIX + batch_id
        with self.client.pipeline(transaction=True) as pipe:
            while True:
                try:
                    # WATCH: two retries of one key at once write the item list only once.
                    pipe.watch(key)
                    if pipe.exists(key):
                        return False
                    pipe.multi()
                    pipe.delete(_items_key(batch_id))  # a leftover list of a half-gone batch
                    pipe.hset(key, mapping={k: str(v) for k, v in meta.items()})
                    for start in range(0, len(entries), READ_CHUNK):
                        chunk = entries[start : start + READ_CHUNK]
                        pipe.rpush(_items_key(batch_id), *(json.dumps(e) for e in chunk))
                    pipe.expire(key, self.ttl)
                    pipe.expire(_items_key(batch_id), self.ttl)
                    pipe.execute()
                    return True
                except redis.WatchError:
                    continue

    def delete(self, batch_id: str) -> None:
        """Forget a batch (none of whose items was accepted)."""
        self.client.delete(KEY_PREFIX + batch_id, _items_key(batch_id))

    def meta(self, batch_id: str) -> dict[str, str] | None:
        """The batch's metadata, or None when unknown or expired."""
        # decode_responses=True: names and values are str.
        raw = cast(dict[str, str], self.client.hgetall(KEY_PREFIX + batch_id))
        return raw or None

    def watch(self, batch_id: str, channel: str, seconds: float) -> None:
        """Have each end of one of the batch's items published on ``channel`` (message
        ``batch:<id>``) for at least ``seconds`` (plus WAKE_MARGIN_SECONDS). Call before
        reading the counts: an end after this call is never missed."""
        pipe = self.client.pipeline(transaction=False)
        pipe.sadd(BATCH_WAKE_PREFIX + batch_id, channel)
        pipe.expire(BATCH_WAKE_PREFIX + batch_id, int(seconds) + 1 + WAKE_MARGIN_SECONDS)
        pipe.execute()

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

    def statuses(self, batch_id: str) -> Iterator[list[str]]:
        """Each chunk of items' statuses (as :func:`item_status`), reading only each job's
        ``status`` field: one pipelined round trip per chunk."""
        for chunk in self.entries(batch_id):
            ids = [e["job_id"] for e in chunk if "job_id" in e]
            with self.client.pipeline(transaction=False) as pipe:
                for job_id in ids:
                    pipe.hget(JOB_PREFIX + job_id, "status")
                found = dict(zip(ids, pipe.execute(), strict=True)) if ids else {}
            yield [
                "failed"
                if "error" in e or found.get(e["job_id"]) is None
                else _text(found[e["job_id"]])
                for e in chunk
            ]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


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
        # Also an item Redis refused when the batch was submitted (listed in its "rejected"):
        # resubmitting the batch with its idempotency key creates it.
        message = "the job record expired, or Redis refused it when the batch was submitted"
        error = {"code": "expired", "message": message, "details": {}}
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
    for chunk in store.statuses(batch_id):
        for status in chunk:
            counts["total"] += 1
            counts[status if status in TERMINAL_STATUSES else "pending"] += 1
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
