"""Find accepted jobs whose message the broker lost, and publish them again.

kombu's Redis transport pops a message (BRPOP) and only then records it as
unacknowledged; a worker killed in between loses it. So does an API process
that dies between recording a job and publishing it. Every job the API or the
SDK accepts is recorded with a copy of its message and listed as pending until
it finishes. A sweep (one worker at a time, under a lock) looks at pending jobs
still "queued" after ``lost_after`` seconds, and republishes those that are
neither waiting in their queue nor held unacknowledged by a worker — seen so on
two sweeps in a row, so a message caught mid-handover is never counted.
Publishing twice is harmless: a job runs to completion and bills once.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from collections.abc import Callable
from typing import Any

import redis

from worker.contract import QUEUES
from worker.jobs import KEY_PREFIX, PENDING_KEY

log = logging.getLogger("dspy_fleet.recovery")

LOCK_KEY = "dspy_fleet:recovery:lock"
SUSPECTS_KEY = "dspy_fleet:recovery:suspects"
UNACKED_KEY = "unacked"  # kombu's Redis transport: delivery tag -> [message, exchange, key]
SCAN_CHUNK = 500
SCAN_CAP = 20_000  # per queue and sweep; a deeper backlog is checked on later sweeps

Publish = Callable[[str, dict[str, Any], str, str | None], None]


def _message_meta(raw: str) -> tuple[str | None, str | None]:
    """(task id, submitted_at) of a kombu message in a Redis list."""
    try:
        msg = json.loads(raw)
        task_id = msg.get("headers", {}).get("id")
        body = json.loads(base64.b64decode(msg["body"]))
        return task_id, body[1].get("submitted_at")
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return None, None


def _ids_in_queue(client: redis.Redis, queue: str, newest: str) -> tuple[set[str], bool]:
    """Task ids in ``queue`` submitted up to ``newest``; and whether that part was all read.

    Redis lists are FIFO from the right, so the oldest messages come first.
    """
    found: set[str] = set()
    start = 0
    while start < SCAN_CAP:
        chunk = client.lrange(queue, -(start + SCAN_CHUNK), -(start + 1))
        if not chunk:
            return found, True
        for raw in reversed(chunk):
            task_id, submitted = _message_meta(raw)
            if task_id:
                found.add(task_id)
            if submitted and submitted > newest:
                return found, True
        if len(chunk) < SCAN_CHUNK:
            return found, True
        start += SCAN_CHUNK
    return found, False


def _ids_unacked(client: redis.Redis) -> set[str]:
    ids = set()
    for raw in client.hvals(UNACKED_KEY):
        try:
            ids.add(json.loads(raw)[0]["headers"]["id"])
        except (ValueError, KeyError, IndexError, TypeError):
            continue
    return ids


def sweep(
    client: redis.Redis, publish: Publish, *, lost_after: float, interval: float
) -> list[str]:
    """One recovery sweep; returns the ids of the jobs it published again."""
    if not client.set(LOCK_KEY, "1", nx=True, ex=max(1, int(interval))):
        return []  # another worker swept moments ago
    now = time.time()
    candidates = client.zrangebyscore(PENDING_KEY, "-inf", now - lost_after, start=0, num=500)
    if not candidates:
        client.delete(SUSPECTS_KEY)
        return []
    pipe = client.pipeline(transaction=False)
    for job_id in candidates:
        pipe.hmget(KEY_PREFIX + job_id, "status", "message", "queue", "request_id", "created_at")
    queued: dict[str, tuple[dict[str, Any], str, str | None, str]] = {}
    gone = []
    for job_id, (status, message, queue, request_id, created) in zip(
        candidates, pipe.execute(), strict=True
    ):
        if status is None or message is None:
            gone.append(job_id)  # expired, or created without a message copy: nothing to do
        elif status == "queued":
            queued[job_id] = (
                json.loads(message),
                queue or "interactive",
                request_id,
                created or "",
            )
    if gone:
        client.zrem(PENDING_KEY, *gone)
    if not queued:
        return []
    newest = max(c for *_, c in queued.values())
    present: set[str] = set()
    complete = True
    for queue in QUEUES:
        ids, whole = _ids_in_queue(client, queue, newest)
        present |= ids
        complete = complete and whole
    present |= _ids_unacked(client)
    missing = [j for j in queued if j not in present] if complete else []
    suspects = set(client.smembers(SUSPECTS_KEY))
    lost = [j for j in missing if j in suspects]
    pipe = client.pipeline(transaction=True)
    pipe.delete(SUSPECTS_KEY)
    fresh = [j for j in missing if j not in suspects]
    if fresh:
        pipe.sadd(SUSPECTS_KEY, *fresh)
        pipe.expire(SUSPECTS_KEY, int(max(interval * 10, lost_after * 2)))
    pipe.execute()
    for job_id in lost:
        message, queue, request_id, _ = queued[job_id]
        publish(job_id, message, queue, request_id)
        client.zadd(PENDING_KEY, {job_id: time.time()}, xx=True)
        log.warning("republished a job whose message was lost", extra={"job_id": job_id})
    return lost
