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
from typing import Any, NamedTuple

import redis

from worker import ledger

KEY_PREFIX = "dspy_fleet:job:"
FINISHED_PREFIX = "dspy_fleet:finished:"
# Jobs accepted but not finished, scored by when they were accepted.
PENDING_KEY = "dspy_fleet:pending"
DONE_CHANNEL = "dspy_fleet:job_done"
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
STATUSES = ("queued", "running", "retrying", "succeeded", "failed", "cancelled")
_JSON_FIELDS = ("outputs", "error", "cost", "message")
_FLOAT_FIELDS = ("retry_in_seconds",)
_INT_FIELDS = ("attempts",)

# Pieces of the create scripts. ARGV: ttl, n, n field/value pairs (the job id among them).
_EXISTS = "if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end\n"
_STORE = """
local n = tonumber(ARGV[2])
redis.call('HSET', KEYS[1], unpack(ARGV, 3, 2 + 2 * n))
redis.call('EXPIRE', KEYS[1], ARGV[1])
"""
# Until it finishes, the job is watched for a lost message (worker/recovery.py).
_WATCH = """
local t = redis.call('TIME')
redis.call('ZADD', KEYS[3], tonumber(t[1]) + tonumber(t[2]) / 1e6,
           redis.call('HGET', KEYS[1], 'job_id'))
"""

# Create the hash only if it does not exist, atomically, so two submissions of
# one idempotency key can never both enqueue. A job born finished (a cache hit the
# API served) also gets its finished marker and its bill.
# KEYS: job, finished marker, pending set, [day hash]. ARGV: ttl, n, pairs, [day ttl, bill].
_CREATE = (
    _EXISTS
    + _STORE
    + """
if #KEYS == 4 then
  local b = 3 + 2 * n
  redis.call('SET', KEYS[2], '1', 'EX', ARGV[1])
  for i = b + 1, #ARGV, 2 do redis.call('HINCRBY', KEYS[4], ARGV[i], ARGV[i + 1]) end
  redis.call('EXPIRE', KEYS[4], ARGV[b])
  return 1
end
"""
    + _WATCH
    + "return 1\n"
)

# The API's submit in one round-trip: the L2 cache entry when there is one (nothing
# is created: the caller answers from it), else _CREATE's queued job.
# KEYS: job, finished marker, pending set, L2 key. ARGV: as _CREATE without a bill.
_CREATE_UNLESS_CACHED = (
    """
local hit = redis.call('GET', KEYS[4])
if hit then return hit end
"""
    + _EXISTS
    + _STORE
    + _WATCH
    + "return 1\n"
)

# Finish a job exactly once: the first terminal write wins (SET NX on the marker);
# its fields, its bill and the wake-up all happen in this one atomic script, so a
# job is never finished-but-unbilled and a redelivered copy can never bill again.
# KEYS: job, finished marker, [day hash]. ARGV: ttl, channel, job id, n, pairs, [day ttl, bill].
_FINISH = """
if not redis.call('SET', KEYS[2], '1', 'NX', 'EX', ARGV[1]) then return 0 end
-- Leftovers of earlier attempts (a failure writes its own error below), and the
-- copy of the message kept for recovery: a finished job needs neither.
redis.call('HDEL', KEYS[1], 'error', 'retry_in_seconds', 'message')
redis.call('ZREM', KEYS[3], ARGV[3])
local n = tonumber(ARGV[4])
redis.call('HSET', KEYS[1], unpack(ARGV, 5, 4 + 2 * n))
redis.call('EXPIRE', KEYS[1], ARGV[1])
if #KEYS == 4 then
  local b = 5 + 2 * n
  for i = b + 1, #ARGV, 2 do redis.call('HINCRBY', KEYS[4], ARGV[i], ARGV[i + 1]) end
  redis.call('EXPIRE', KEYS[4], ARGV[b])
end
redis.call('PUBLISH', ARGV[2], ARGV[3])
return 1
"""

# Mark a job running unless it already ended (a redelivered message of a finished
# job must not flip it back). Metadata is only filled in when absent: direct
# producers that skip the SDK create the record here. Returns the old status.
# K: job. A: ttl, n, n metadata pairs, update pairs.
_START_FUNCTION = """
local function job_start(K, A)
  local status = redis.call('HGET', K[1], 'status')
  if status == 'succeeded' or status == 'failed' or status == 'cancelled' then return status end
  local n = tonumber(A[2])
  for i = 0, n - 1 do
    redis.call('HSETNX', K[1], A[3 + 2 * i], A[4 + 2 * i])
  end
  redis.call('HSET', K[1], unpack(A, 3 + 2 * n))
  redis.call('EXPIRE', K[1], A[1])
  return status or ''
end
"""
_START = _START_FUNCTION + "return job_start(KEYS, ARGV)\n"

# Start, then (unless the job already ended) another script's function, in one
# round trip: the worker asks the model's breaker as it claims the job. KEYS: job,
# then the function's keys. ARGV: number of start args, start args, its args.
_START_THEN = """
local ns = tonumber(ARGV[1])
local prev = job_start({KEYS[1]}, {unpack(ARGV, 2, 1 + ns)})
if prev == 'succeeded' or prev == 'failed' or prev == 'cancelled' then return {prev} end
return {prev, %s({unpack(KEYS, 2)}, {unpack(ARGV, 2 + ns)})}
"""


class LuaCall(NamedTuple):
    """A call of a Lua function defined in ``source``, for :meth:`JobStore.start` to run."""

    source: str  # defines the function `name` (local function name(K, A) ... end)
    name: str
    keys: list[str]
    args: list[Any]


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
    for key in _FLOAT_FIELDS:
        if key in job:
            job[key] = float(job[key])
    return job


class JobStore:
    """Reads and writes job records; every method is one Redis round-trip or script."""

    def __init__(self, client: redis.Redis, ttl_seconds: int) -> None:
        self.client = client
        self.ttl = ttl_seconds
        self._create = client.register_script(_CREATE)
        self._create_unless_cached = client.register_script(_CREATE_UNLESS_CACHED)
        self._start = client.register_script(_START)
        self._start_then: dict[str, Any] = {}
        self._finish = client.register_script(_FINISH)

    @staticmethod
    def key(job_id: str) -> str:
        """The Redis key of a job."""
        return KEY_PREFIX + job_id

    def create(
        self,
        job_id: str,
        fields: Mapping[str, Any],
        bill: ledger.Bill | None = None,
        message: Mapping[str, Any] | None = None,
    ) -> bool:
        """Record a job (queued unless ``fields`` says otherwise; finished and billed if ``bill``).

        ``message`` (the v1 kwargs) is kept until the job finishes, so that a message
        the broker lost can be published again. False when the job id already
        exists (an idempotent replay): nothing changes.
        """
        extra = {"message": dict(message)} if message is not None else {}
        pairs = _pairs({"job_id": job_id, "status": "queued", **fields, **extra})
        keys = [self.key(job_id), FINISHED_PREFIX + job_id, PENDING_KEY]
        argv: list[Any] = [self.ttl, len(pairs) // 2, *pairs]
        if bill is not None:
            keys.append(bill.key)
            argv += [ledger.KEEP_SECONDS, *bill.pairs]
        return bool(self._create(keys=keys, args=argv))

    def create_unless_cached(
        self, job_id: str, fields: Mapping[str, Any], message: Mapping[str, Any], l2_key: str
    ) -> bool | str:
        """:meth:`create` a queued job, unless Redis holds the cache entry ``l2_key``: then
        nothing is created and the entry (its raw JSON) is returned. One round-trip."""
        pairs = _pairs({"job_id": job_id, "status": "queued", **fields, "message": dict(message)})
        out = self._create_unless_cached(
            keys=[self.key(job_id), FINISHED_PREFIX + job_id, PENDING_KEY, l2_key],
            args=[self.ttl, len(pairs) // 2, *pairs],
        )
        if isinstance(out, bytes):
            out = out.decode()
        return out if isinstance(out, str) else bool(out)

    def get(self, job_id: str) -> dict[str, Any] | None:
        """The job record, or None for an unknown (or expired) id."""
        raw = self.client.hgetall(self.key(job_id))
        return {"job_id": job_id, **decode(raw)} if raw else None

    def start(
        self,
        job_id: str,
        metadata: Mapping[str, Any],
        updates: Mapping[str, Any],
        then: LuaCall | None = None,
    ) -> tuple[str | None, Any]:
        """Mark running; returns the previous status ('' if new, terminal if already done)
        and, unless the job had ended, the reply of ``then`` (run in the same script)."""
        meta = _pairs({"job_id": job_id, **metadata})
        argv = [self.ttl, len(meta) // 2, *meta, *_pairs(updates)]
        if then is None:
            return self._start(keys=[self.key(job_id)], args=argv) or None, None
        script = self._start_then.get(then.source)
        if script is None:
            source = _START_FUNCTION + then.source + _START_THEN % then.name
            script = self._start_then[then.source] = self.client.register_script(source)
        reply = script(keys=[self.key(job_id), *then.keys], args=[len(argv), *argv, *then.args])
        return reply[0] or None, reply[1] if len(reply) > 1 else None

    def update(self, job_id: str, fields: Mapping[str, Any]) -> None:
        """Set fields of a job (status changes that are not terminal)."""
        self.client.hset(self.key(job_id), mapping=encode(fields))

    def finish(
        self, job_id: str, fields: Mapping[str, Any], bill: ledger.Bill | None = None
    ) -> bool:
        """Write a terminal status, apply the bill and wake waiters, once per job.

        Returns False when the job had already been finished (by a redelivered or
        concurrent copy of its message): then nothing was written or billed.
        """
        pairs = _pairs(fields)
        keys = [self.key(job_id), FINISHED_PREFIX + job_id, PENDING_KEY]
        argv: list[Any] = [self.ttl, DONE_CHANNEL, job_id, len(pairs) // 2, *pairs]
        if bill is not None:
            keys.append(bill.key)
            argv += [ledger.KEEP_SECONDS, *bill.pairs]
        return bool(self._finish(keys=keys, args=argv))
