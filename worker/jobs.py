"""The job store: one Redis hash per job, the view of a job that the API and SDK read.

The worker writes status transitions here and publishes a terminal event so that
waiting HTTP requests wake at once. Celery's own result backend also receives the
task's return value (or failure) for producers that read Celery results directly.
Never import dspy here: the API uses this module.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import redis

KEY_PREFIX = "dspy_fleet:job:"
DONE_CHANNEL = "dspy_fleet:job_done"
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
STATUSES = ("queued", "running", "retrying", "succeeded", "failed", "cancelled")
_JSON_FIELDS = ("outputs", "error", "cost")
_INT_FIELDS = ("attempts",)

# Create the hash only if it does not exist, atomically, so two submissions of
# one idempotency key can never both enqueue. ARGV[1] is the TTL.
_CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
redis.call('EXPIRE', KEYS[1], ARGV[1])
return 1
"""

# Mark a job running unless it already ended (a redelivered message of a finished
# job must not flip it back). Metadata is only filled in when absent: direct
# producers that skip the SDK create the record here. Returns the old status.
_START = """
local status = redis.call('HGET', KEYS[1], 'status')
if status == 'succeeded' or status == 'failed' or status == 'cancelled' then return status end
local n = tonumber(ARGV[2])
for i = 0, n - 1 do
  redis.call('HSETNX', KEYS[1], ARGV[3 + 2 * i], ARGV[4 + 2 * i])
end
local base = 3 + 2 * n
redis.call('HSET', KEYS[1], unpack(ARGV, base))
redis.call('EXPIRE', KEYS[1], ARGV[1])
return status or ''
"""


def _iso(value: datetime | str | None) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return value.isoformat().replace("+00:00", "Z")


def encode(fields: Mapping[str, Any]) -> dict[str, str]:
    """Field values as Redis stores them; None means "leave unset"."""
    out: dict[str, str] = {}
    for key, value in fields.items():
        if value is None:
            continue
        if key in _JSON_FIELDS:
            value = json.dumps(value, separators=(",", ":"))
        elif isinstance(value, datetime):
            value = _iso(value)
        elif isinstance(value, bool):
            value = "1" if value else "0"
        out[key] = str(value)
    return out


def _pairs(fields: Mapping[str, Any]) -> list[str]:
    return [part for item in encode(fields).items() for part in item]


def decode(raw: Mapping[str, str]) -> dict[str, Any]:
    """A stored hash as the API shows it: JSON fields parsed, counters as ints."""
    job: dict[str, Any] = dict(raw)
    for key in _JSON_FIELDS:
        if key in job:
            job[key] = json.loads(job[key])
    for key in _INT_FIELDS:
        if key in job:
            job[key] = int(job[key])
    return job


class JobStore:
    """Reads and writes job records; every method is one Redis round-trip or script."""

    def __init__(self, client: redis.Redis, ttl_seconds: int) -> None:
        self.client = client
        self.ttl = ttl_seconds
        self._create = client.register_script(_CREATE)
        self._start = client.register_script(_START)

    @staticmethod
    def key(job_id: str) -> str:
        """The Redis key of a job."""
        return KEY_PREFIX + job_id

    def create(self, job_id: str, fields: Mapping[str, Any]) -> bool:
        """Record a queued job; False when the job id already exists (idempotent replay)."""
        argv = [self.ttl, *_pairs({"job_id": job_id, "status": "queued", **fields})]
        return bool(self._create(keys=[self.key(job_id)], args=argv))

    def get(self, job_id: str) -> dict[str, Any] | None:
        """The job record, or None for an unknown (or expired) id."""
        raw = self.client.hgetall(self.key(job_id))
        return {"job_id": job_id, **decode(raw)} if raw else None

    def delete(self, job_id: str) -> None:
        """Forget a job that was never enqueued (the broker refused it)."""
        self.client.delete(self.key(job_id))

    def start(
        self, job_id: str, metadata: Mapping[str, Any], updates: Mapping[str, Any]
    ) -> str | None:
        """Mark running; returns the previous status ('' if new, terminal if already done)."""
        meta = _pairs({"job_id": job_id, **metadata})
        argv = [self.ttl, len(meta) // 2, *meta, *_pairs(updates)]
        prev = self._start(keys=[self.key(job_id)], args=argv)
        return prev if prev else None

    def update(self, job_id: str, fields: Mapping[str, Any]) -> None:
        """Set fields of a job (status changes that are not terminal)."""
        self.client.hset(self.key(job_id), mapping=encode(fields))

    def finish(self, job_id: str, fields: Mapping[str, Any]) -> None:
        """Write a terminal status and wake every waiter, in one round-trip."""
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(self.key(job_id), mapping=encode(fields))
        pipe.expire(self.key(job_id), self.ttl)
        pipe.publish(DONE_CHANNEL, job_id)
        pipe.execute()
