"""The job store: one Redis hash per job, the view of a job that the API and SDK read.

The worker writes status transitions here; when a job ends, the same script wakes the
API processes that hold requests waiting for it (one PUBLISH per waiting process, none
when nobody waits: see :meth:`JobStore.watch`). Celery's own result backend also receives the
task's return value (or failure) for producers that read Celery results directly.
Never import dspy here: the API uses this module.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from datetime import datetime
from typing import Any, NamedTuple, cast

import redis

from dspy_fleet.contract import DEFAULT_TENANT, JOB_STATUSES, TERMINAL_STATUSES, JobMessage
from dspy_fleet.store import ledger, quotas
from dspy_fleet.store.feedback import RECORD_OUTCOME
from dspy_fleet.store.traces import STASH_TRACE

KEY_PREFIX = "dspy_fleet:job:"
FINISHED_PREFIX = "dspy_fleet:finished:"
# The running job's owner: its lease token, expiring on Redis's clock (PX).
LEASE_PREFIX = "dspy_fleet:lease:"
# The due-time index: every job not yet finished, scored by the next time (Redis clock,
# seconds) someone must look at it: queued → accepted + recovery_after, retrying → its
# retry's due time, throttled → its turn at the provider's limit, running → its lease's
# expiry (worker/recovery.py looks).
PENDING_KEY = "dspy_fleet:pending"
# Who waits for a job: a set of pub/sub channels, one per API process holding a request for
# it (JobStore.watch adds; each step publishes ``<status> <job id>`` to each, an end the bare
# job id, and the finish script then drops the set: see :func:`read_wake`).
WAKE_PREFIX = "dspy_fleet:wake:"
# A batch's wake set: the channels of the API processes streaming its events; the scripts
# that end its items publish ``batch:<id>`` on each (see _CALLBACK_DUE).
BATCH_WAKE_PREFIX = WAKE_PREFIX + "batch:"
# A wake set outlives the longest wait that registered in it by this much (a job that
# never ends leaves no set behind).
WAKE_MARGIN_SECONDS = 60
# Webhooks: the due-time index of callbacks to deliver (a sorted set on Redis's clock;
# members "job:<id>" and "batch:<id>"; dspy_fleet/store/callbacks.py owns it), and the
# batches' metadata hashes (dspy_fleet/store/batches.py), whose "ended" counter the finish
# script keeps for batches that have a callback.
CALLBACKS_KEY = "dspy_fleet:callbacks"
BATCH_PREFIX = "dspy_fleet:batch:"
# Each job's event log (GET /v1/predictions/<id>/events): a Redis list appended by the
# scripts that change the job's status, in the same atomic step, so the log and the record
# never disagree. Each entry is JSON: ``n`` (1, 2, ...: the event's id), ``t`` (Redis's
# clock, "<s>.<us>"), ``status`` and, for a status that has them, ``attempts``,
# ``retry_in_seconds`` + ``error`` (retrying, the error as JSON text), ``throttled_until`` +
# ``throttle_reason`` (throttled); a terminal entry holds only those three (the API shows the
# record then). The list lives as long as its job's record (it takes the record's TTL at each
# append) and keeps the last EVENTS_MAXLEN entries. A list, not a Stream: three small entries
# take about 400 bytes, where a Stream's first node alone takes about 4 KB (measured on Redis
# 6.2 and 7.0), and records live for days (JOB_TTL_SECONDS).
EVENTS_PREFIX = "dspy_fleet:events:"
EVENTS_MAXLEN = 64
_JSON_FIELDS = ("outputs", "error", "cost", "message")
_FLOAT_FIELDS = ("retry_in_seconds",)
_INT_FIELDS = ("attempts", "rate_limited")

# A job that ends with a callback_url on its record is due for delivery now; a job of a
# batch with a callback counts as ended in its batch, and the batch is due once as many
# items ended as it expects (the delivery confirms from the items' statuses that nothing
# is pending before it calls: dspy_fleet/store/callbacks.py). A batch item's end is also
# published (``batch:<id>``) on the channel of each API process in the wake set
# (BATCH_WAKE_PREFIX) of the batch that created it (``batch``) and of the batch that
# counts it (``batch_id``), so that their event streams recount at once instead of polling. Runs
# inside the scripts that end a job, so a job never ends without its callback being
# scheduled. The batch hash is
# a key named from the job's record (not in KEYS), as the due sweep's scripts name job
# keys: fine on the single Redis this fleet runs on.
_CALLBACK_DUE = (
    f"local CALLBACKS, BATCH_PREFIX = '{CALLBACKS_KEY}', '{BATCH_PREFIX}'\n"
    f"local BATCH_WAKE = '{BATCH_WAKE_PREFIX}'\n"
    + """
local function callback_due(job_key, job_id)
  local cb = redis.call('HMGET', job_key, 'callback_url', 'batch_id', 'batch')
  for i = 2, 3 do
    if cb[i] and (i == 2 or cb[3] ~= cb[2]) then
      for _, channel in ipairs(redis.call('SMEMBERS', BATCH_WAKE .. cb[i])) do
        redis.call('PUBLISH', channel, 'batch:' .. cb[i])
      end
    end
  end
  if not cb[1] and not cb[2] then return end
  local t = redis.call('TIME')
  local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
  if cb[1] then redis.call('ZADD', CALLBACKS, now, 'job:' .. job_id) end
  if cb[2] then
    local batch = BATCH_PREFIX .. cb[2]
    if redis.call('EXISTS', batch) == 1 then
      local ended = redis.call('HINCRBY', batch, 'ended', 1)
      local f = redis.call('HMGET', batch, 'expected', 'callback_url')
      if f[2] and ended >= tonumber(f[1] or '0') then
        redis.call('ZADD', CALLBACKS, now, 'batch:' .. cb[2])
      end
    end
  end
end
"""
)

# Append the job's current status to its event log (EVENTS_PREFIX): see the comment there,
# with the record's fields ``names`` (the caller knows which belong to its status; no script
# names a status itself: tests/test_owners.py). ``wake``: also publish on the channel of each
# API process in the job's wake set, so its event streams read on at once: ``<status> <job id>``
# for a step, the bare job id for an end, which API processes from before the status was sent
# wake their waits on in a rolling upgrade (the finish script publishes the bare id by itself,
# and then drops the set). Called after the record
# was written, by every script that changes a job's status (here, in worker/recovery.py and
# in dspy_fleet/store/leases.py). The list and wake keys are named from the job id (not in
# KEYS), like _CALLBACK_DUE's.
JOB_EVENT = (
    f"local EVENTS, WAKE, EVENTS_MAXLEN = '{EVENTS_PREFIX}', '{WAKE_PREFIX}', {EVENTS_MAXLEN}\n"
    + "local EVENT_ENDS = {"
    + ", ".join(f"{status} = true" for status in sorted(TERMINAL_STATUSES))
    + "}\n"
    + """
local function job_event(job_key, job_id, wake, names)
  local status = redis.call('HGET', job_key, 'status')
  if not status then return end
  local key = EVENTS .. job_id
  local last = redis.call('LINDEX', key, -1)
  local t = redis.call('TIME')
  local entry = {n = last and cjson.decode(last).n + 1 or 1, status = status,
                 t = string.format('%s.%06d', t[1], tonumber(t[2]))}
  for _, name in ipairs(names or {}) do
    local value = redis.call('HGET', job_key, name)
    if value then entry[name] = value end
  end
  redis.call('RPUSH', key, cjson.encode(entry))
  redis.call('LTRIM', key, -EVENTS_MAXLEN, -1)
  local ttl = redis.call('TTL', job_key)
  if ttl > 0 then redis.call('EXPIRE', key, ttl) end
  if wake then
    local message = EVENT_ENDS[status] and job_id or (status .. ' ' .. job_id)
    for _, channel in ipairs(redis.call('SMEMBERS', WAKE .. job_id)) do
      redis.call('PUBLISH', channel, message)
    end
  end
end
"""
)

# Pieces of the create scripts. ARGV: ttl, recovery_after, n, n field/value pairs (the job
# id among them).
_EXISTS = "if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end\n"
_STORE = """
local n = tonumber(ARGV[3])
redis.call('HSET', KEYS[1], unpack(ARGV, 4, 3 + 2 * n))
redis.call('EXPIRE', KEYS[1], ARGV[1])
"""
# Until it finishes, the job is in the due-time index: first looked at recovery_after
# seconds from now, if no worker has claimed it by then (worker/recovery.py).
# enqueued_at orders it against the other messages of its queue (the FIFO watermark).
_WATCH = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
redis.call('HSET', KEYS[1], 'enqueued_at', string.format('%.6f', now))
redis.call('ZADD', KEYS[3], now + tonumber(ARGV[2]), redis.call('HGET', KEYS[1], 'job_id'))
"""

# The new job's first event (nobody can stream a job before it exists: no wake-up).
_LOG_CREATED = "job_event(KEYS[1], redis.call('HGET', KEYS[1], 'job_id'), false)\n"

# Create the hash only if it does not exist, atomically, so two submissions of
# one idempotency key can never both enqueue. A job born finished (a cache hit the
# API served) also gets its finished marker, its bill and its A/B sample
# (store/feedback.py).
# KEYS: job, finished marker, pending set, [day hash].
# ARGV: ttl, recovery_after, n, pairs, [day ttl, bill].
_CREATE = (
    _CALLBACK_DUE
    + JOB_EVENT
    + RECORD_OUTCOME
    + _EXISTS
    + _STORE
    + """
if #KEYS == 4 then
  local b = 4 + 2 * n
  redis.call('SET', KEYS[2], '1', 'EX', ARGV[1])
  for i = b + 1, #ARGV, 2 do redis.call('HINCRBY', KEYS[4], ARGV[i], ARGV[i + 1]) end
  redis.call('EXPIRE', KEYS[4], ARGV[b])
  local job_id = redis.call('HGET', KEYS[1], 'job_id')
  callback_due(KEYS[1], job_id)
  record_outcome(KEYS[1], job_id)
  job_event(KEYS[1], job_id, false)
  return 1
end
"""
    + _WATCH
    + _LOG_CREATED
    + "return 1\n"
)

# The API's submit in one round-trip: the L2 cache entry when there is one (nothing
# is created: the caller answers from it), else _CREATE's queued job.
# KEYS: job, finished marker, pending set, L2 key. ARGV: as _CREATE without a bill.
_CREATE_UNLESS_CACHED = (
    JOB_EVENT
    + """
local hit = redis.call('GET', KEYS[4])
if hit then return hit end
"""
    + _EXISTS
    + _STORE
    + _WATCH
    + _LOG_CREATED
    + "return 1\n"
)

# Finish a job exactly once: the first terminal write wins (SET NX on the marker);
# its fields, its bill and the wake-up all happen in this one atomic script, so a
# job is never finished-but-unbilled and a redelivered copy can never bill again.
# A lease holder's write is fenced: it counts only while the hash still names its
# token, so an owner whose lease was taken over (it paused, or was cut off) can never
# overwrite the new owner's result nor bill. Writers without a lease (cancel) pass ''.
# The wake-up: the job id is published on the channel of each API process that watches
# the job (JobStore.watch); a job nobody waits for costs an SMEMBERS of a missing key.
# Returns 1 (written), 0 (already finished) or -1 (lease lost, the job not finished).
# The bill also goes to the tenant's quota counters (tokens today, spend this month, on
# Redis's clock) and turns the job's budget reservation into spend (store/quotas.py); a job
# with a callback is due for its webhook (_CALLBACK_DUE); a job that ran to succeeded or
# failed is sampled for its program's A/B report (store/feedback.py: record_outcome); the
# trace the worker left on the record is kept or parked (store/traces.py: stash_trace).
# KEYS: job, finished marker, pending set, lease, wake set, [day hash, quota hash,
# in-flight hash, in-flight deadlines].
# ARGV: ttl, job id, token, n, pairs, [day ttl, model, tokens, nano-USD, keep s, bill].
_FINISH = (
    _CALLBACK_DUE
    + JOB_EVENT
    + RECORD_OUTCOME
    + STASH_TRACE
    + quotas.CALENDAR
    + quotas.SPEND_FUNCTION
    + """
if ARGV[3] ~= '' and redis.call('HGET', KEYS[1], 'lease') ~= ARGV[3] then
  if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
  return -1
end
if not redis.call('SET', KEYS[2], '1', 'NX', 'EX', ARGV[1]) then return 0 end
-- Leftovers of earlier attempts (a failure writes its own error below), the copy of
-- the message kept for recovery and the lease: a finished job needs none of them.
redis.call('HDEL', KEYS[1], 'error', 'retry_in_seconds', 'message', 'lease', 'suspect',
           'throttled_until', 'throttle_reason')
if ARGV[3] ~= '' and redis.call('GET', KEYS[4]) == ARGV[3] then redis.call('DEL', KEYS[4]) end
redis.call('ZREM', KEYS[3], ARGV[2])
local n = tonumber(ARGV[4])
redis.call('HSET', KEYS[1], unpack(ARGV, 5, 4 + 2 * n))
redis.call('EXPIRE', KEYS[1], ARGV[1])
if #KEYS == 9 then
  local b = 5 + 2 * n
  for i = b + 5, #ARGV, 2 do redis.call('HINCRBY', KEYS[6], ARGV[i], ARGV[i + 1]) end
  redis.call('EXPIRE', KEYS[6], ARGV[b])
  quota_spend({KEYS[7], KEYS[8], KEYS[9]}, {ARGV[2], ARGV[b + 1], ARGV[b + 2], ARGV[b + 3],
              ARGV[b + 4]})
end
callback_due(KEYS[1], ARGV[2])
record_outcome(KEYS[1], ARGV[2])
stash_trace(KEYS[1], ARGV[2])
job_event(KEYS[1], ARGV[2], false)
local waiting = redis.call('SMEMBERS', KEYS[5])
if #waiting > 0 then
  for _, channel in ipairs(waiting) do redis.call('PUBLISH', channel, ARGV[2]) end
  redis.call('DEL', KEYS[5])
end
return 1
"""
)

# Hand a failed attempt back for a retry at a due time (no Celery countdown message:
# one would outlive the broker's visibility timeout and run twice). Fenced like
# _FINISH. The message copy is kept (stored if a raw producer never gave one) so the
# due sweep can publish it; ``retries`` counts the retries scheduled, so the next
# claim knows its attempt number whichever message delivers it.
# KEYS: job, lease, pending set. ARGV: token, countdown s, job id, message, n, pairs.
_RETRY = (
    JOB_EVENT
    + """
if redis.call('HGET', KEYS[1], 'lease') ~= ARGV[1] then return 0 end
local n = tonumber(ARGV[5])
redis.call('HSET', KEYS[1], unpack(ARGV, 6, 5 + 2 * n))
redis.call('HSETNX', KEYS[1], 'message', ARGV[4])
redis.call('HINCRBY', KEYS[1], 'retries', 1)
redis.call('HDEL', KEYS[1], 'lease')
if redis.call('GET', KEYS[2]) == ARGV[1] then redis.call('DEL', KEYS[2]) end
local t = redis.call('TIME')
redis.call('ZADD', KEYS[3], tonumber(t[1]) + tonumber(t[2]) / 1e6 + tonumber(ARGV[2]), ARGV[3])
job_event(KEYS[1], ARGV[3], true, {'attempts', 'retry_in_seconds', 'error'})
return 1
"""
)

# Hand a job whose model is at its provider limit back, to come back at its turn: like
# _RETRY, but no attempt is spent (``retries`` stays) and the status is ``throttled``.
# A provider's 429 counts in ``rate_limited``; past ARGV[7] of them the job is not
# handed back (-2) and the caller fails it. Fenced like _FINISH (0: lease lost).
# KEYS: job, lease, pending set. ARGV: token, due in s, job id, message, n, 429 (1/0),
# max 429s, pairs.
_THROTTLE = (
    JOB_EVENT
    + """
if redis.call('HGET', KEYS[1], 'lease') ~= ARGV[1] then return 0 end
if ARGV[6] == '1' then
  if tonumber(redis.call('HGET', KEYS[1], 'rate_limited') or '0') >= tonumber(ARGV[7]) then
    return -2
  end
  redis.call('HINCRBY', KEYS[1], 'rate_limited', 1)
end
local n = tonumber(ARGV[5])
redis.call('HSET', KEYS[1], unpack(ARGV, 8, 7 + 2 * n))
redis.call('HSETNX', KEYS[1], 'message', ARGV[4])
redis.call('HDEL', KEYS[1], 'lease')
if redis.call('GET', KEYS[2]) == ARGV[1] then redis.call('DEL', KEYS[2]) end
local t = redis.call('TIME')
redis.call('ZADD', KEYS[3], tonumber(t[1]) + tonumber(t[2]) / 1e6 + tonumber(ARGV[2]), ARGV[3])
job_event(KEYS[1], ARGV[3], true, {'throttled_until', 'throttle_reason'})
return 1
"""
)

# Give a lease up (the job is handed back unfinished: our Redis failed under it, or the
# worker shuts down), so the handed-back message is claimed at once instead of after the
# lease lapses. Only our own token's lease. KEYS: lease. ARGV: token.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# The terminal statuses as a Lua set, written from the Python owner (contract.py) so
# the scripts can never disagree with it.
_LUA_TERMINAL = (
    "local TERMINAL = {" + ", ".join(f"{s} = true" for s in sorted(TERMINAL_STATUSES)) + "}\n"
)

# Claim a job: mark it running under a new lease unless it already ended (a redelivered
# message of a finished job must not flip it back) or another delivery holds a live
# lease (a broker redelivery, a duplicate message, a recovery republish while the owner
# still runs: that delivery must not call the provider). Metadata is only filled in
# when absent: direct producers that skip the SDK create the record here. The attempt
# number is 1 + the retries scheduled so far, read from the record (not from Celery).
# Returns {terminal status} | {'leased', ms left} | {previous status or '', attempt}.
# K: job, lease, pending set. A: ttl, token, lease ms, n, n metadata pairs, update pairs.
_START_FUNCTION = (
    _LUA_TERMINAL
    + JOB_EVENT
    + """
local function job_start(K, A)
  local status = redis.call('HGET', K[1], 'status')
  if TERMINAL[status] then return {status} end
  if redis.call('EXISTS', K[2]) == 1 then return {'leased', redis.call('PTTL', K[2])} end
  redis.call('SET', K[2], A[2], 'PX', A[3])
  local n = tonumber(A[4])
  for i = 0, n - 1 do
    redis.call('HSETNX', K[1], A[5 + 2 * i], A[6 + 2 * i])
  end
  redis.call('HSET', K[1], unpack(A, 5 + 2 * n))
  local attempt = 1 + tonumber(redis.call('HGET', K[1], 'retries') or '0')
  redis.call('HSET', K[1], 'lease', A[2], 'attempts', attempt)
  redis.call('HDEL', K[1], 'suspect', 'throttled_until', 'throttle_reason')
  redis.call('EXPIRE', K[1], A[1])
  local t = redis.call('TIME')
  local job_id = redis.call('HGET', K[1], 'job_id')
  redis.call('ZADD', K[3], tonumber(t[1]) + tonumber(t[2]) / 1e6 + tonumber(A[3]) / 1000, job_id)
  job_event(K[1], job_id, true, {'attempts'})
  return {status or '', attempt}
end
"""
)
_START = _START_FUNCTION + "return job_start(KEYS, ARGV)\n"

# Claim, then (if the job is ours now) another script's function, in one round trip:
# the worker asks the model's breaker as it claims the job. KEYS: job, lease, pending
# set, then the function's keys. ARGV: number of start args, start args, its args.
_START_THEN = """
local ns = tonumber(ARGV[1])
local r = job_start({KEYS[1], KEYS[2], KEYS[3]}, {unpack(ARGV, 2, 1 + ns)})
if TERMINAL[r[1]] or r[1] == 'leased' then return r end
r[3] = %s({unpack(KEYS, 4)}, {unpack(ARGV, 2 + ns)})
return r
"""


# Register an API process's channel as waiting for a job, and read the job, atomically:
# the finish script either ran before (the job read is terminal; nothing registered) or
# runs after and sees the channel. Returns the job's fields (flat), empty if none.
# KEYS: job, wake set. ARGV: channel, seconds the set must live.
_WATCH_JOB = (
    _LUA_TERMINAL
    + """
local job = redis.call('HGETALL', KEYS[1])
if #job == 0 then return job end
if not TERMINAL[redis.call('HGET', KEYS[1], 'status')] then
  redis.call('SADD', KEYS[2], ARGV[1])
  if redis.call('TTL', KEYS[2]) < tonumber(ARGV[2]) then redis.call('EXPIRE', KEYS[2], ARGV[2]) end
end
return job
"""
)


class Claim(NamedTuple):
    """What :meth:`JobStore.start` found: the job is ours (``token``), ended, or leased."""

    prev: str | None  # the previous status ('' → None); terminal if the job had ended
    token: str | None  # our lease token when the job is ours to run
    attempt: int  # this attempt's number (1 + retries scheduled), when ours
    leased_ms: int | None  # another delivery owns the job: its lease's time left
    reply: Any  # the reply of ``then``, when ours

    @property
    def leased(self) -> bool:
        """Another delivery holds a live lease on the job: leave it to that owner."""
        return self.leased_ms is not None


class LuaCall(NamedTuple):
    """A call of a Lua function defined in ``source``, for :meth:`JobStore.start` to run."""

    source: str  # defines the function `name` (local function name(K, A) ... end)
    name: str
    keys: list[str]
    args: list[Any]


def read_wake(message: str) -> tuple[str, str | None]:
    """What a wake notification names: ``(job id, its status)`` for a step
    (``<status> <job id>``), or ``(key, None)``: a job's end (its bare id, which API
    processes of every version wake their waits on; older workers sent it for steps too), or
    a batch's ``batch:<id>``. The waiter reads the job after a wake without a status.

    Statuses have no spaces; a job id may, so the first space splits. A bare job id that
    itself reads as ``<status> <id>`` is told apart by the caller (api/waiter.py), which
    first looks the whole message up among the ids it waits for."""
    status, sep, job_id = message.partition(" ")
    if sep and status in JOB_STATUSES:
        return job_id, status
    return message, None


def job_record(
    message: JobMessage,
    *,
    program: str | None = None,
    model: str | None = None,
    variant: str | None = None,
    queue: str | None = None,
) -> dict[str, Any]:
    """The job-store fields of an accepted job: the one place they are built.

    The keywords are what planning (or the delivery) decided, over what the message
    names; a field that stays None is left unset until a worker fills it in.
    """
    return {
        "program": program or message.program,
        "model": model or message.model,
        "variant": variant or message.variant,
        "tenant": message.tenant,
        "request_id": message.request_id,
        "queue": queue or message.priority,
        "created_at": message.submitted_at,
        # Kept on the record, so that the script that ends the job schedules its webhook.
        "callback_url": message.callback_url,
    }


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

    def __init__(
        self,
        client: redis.Redis,
        ttl_seconds: int,
        *,
        recovery_after: float = 0.0,
        lease_seconds: float = 30.0,
    ) -> None:
        self.client = client
        self.ttl = ttl_seconds
        # When an accepted job is first looked at by the due sweep, if unclaimed by then
        # (RECOVERY_AFTER_SECONDS; 0: at once, and the sweep puts it off by its own).
        self.recovery_after = recovery_after
        self.lease_ms = max(1, int(lease_seconds * 1000))
        self._create = client.register_script(_CREATE)
        self._create_unless_cached = client.register_script(_CREATE_UNLESS_CACHED)
        self._start = client.register_script(_START)
        self._start_then: dict[str, Any] = {}
        self._finish = client.register_script(_FINISH)
        self._watch = client.register_script(_WATCH_JOB)
        self._retry = client.register_script(_RETRY)
        self._throttle = client.register_script(_THROTTLE)
        self._release = client.register_script(_RELEASE)

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
        argv: list[Any] = [self.ttl, self.recovery_after, len(pairs) // 2, *pairs]
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
            args=[self.ttl, self.recovery_after, len(pairs) // 2, *pairs],
        )
        if isinstance(out, bytes):
            out = out.decode()
        return out if isinstance(out, str) else bool(out)

    def get(self, job_id: str) -> dict[str, Any] | None:
        """The job record, or None for an unknown (or expired) id."""
        raw = self.client.hgetall(self.key(job_id))
        # decode_responses=True: names and values are str.
        return {"job_id": job_id, **decode(cast(dict[str, str], raw))} if raw else None

    def watch(self, job_id: str, channel: str, seconds: float) -> dict[str, Any] | None:
        """:meth:`get`, and unless the job has ended, have its steps and its end published
        on ``channel`` (:func:`read_wake`), by whichever writer makes them, for at least
        ``seconds`` (plus WAKE_MARGIN_SECONDS). One round trip; atomic with the read, so an
        end is never missed between the two."""
        ttl = int(seconds) + 1 + WAKE_MARGIN_SECONDS
        flat = self._watch(keys=[self.key(job_id), WAKE_PREFIX + job_id], args=[channel, ttl])
        if not flat:
            return None
        raw = {_text(flat[i]): _text(flat[i + 1]) for i in range(0, len(flat), 2)}
        return {"job_id": job_id, **decode(raw)}

    def events(self, job_id: str, after: int | None = None) -> tuple[list[dict[str, Any]], bool]:
        """The job's event log (EVENTS_PREFIX) after event ``after`` (its ``n``; None: from
        the start), oldest first, each entry decoded ({n, t, status, ...}: see
        EVENTS_PREFIX), and whether the job's record still exists. One pipelined round
        trip."""
        pipe = self.client.pipeline(transaction=False)
        pipe.lrange(EVENTS_PREFIX + job_id, 0, -1)
        pipe.exists(self.key(job_id))
        raw, exists = pipe.execute()
        entries = [json.loads(_text(item)) for item in raw]
        return [e for e in entries if after is None or int(e["n"]) > after], bool(exists)

    def statuses(self, job_ids: list[str]) -> list[str | None]:
        """The status of each job (None for an unknown one), in one pipelined round trip."""
        pipe = self.client.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hget(self.key(job_id), "status")
        return [None if s is None else _text(s) for s in pipe.execute()]

    def start(
        self,
        job_id: str,
        metadata: Mapping[str, Any],
        updates: Mapping[str, Any],
        then: LuaCall | None = None,
    ) -> Claim:
        """Claim the job for this delivery under a new lease (status running), unless it
        ended or another delivery holds its lease; ``then`` runs in the same script, only
        when the claim succeeds."""
        token = uuid.uuid4().hex
        meta = _pairs({"job_id": job_id, **metadata})
        sets = _pairs({**updates, "status": "running"})
        argv: list[Any] = [self.ttl, token, self.lease_ms, len(meta) // 2, *meta, *sets]
        keys = [self.key(job_id), LEASE_PREFIX + job_id, PENDING_KEY]
        if then is None:
            reply = self._start(keys=keys, args=argv)
        else:
            script = self._start_then.get(then.source)
            if script is None:
                source = _START_FUNCTION + then.source + _START_THEN % then.name
                script = self._start_then[then.source] = self.client.register_script(source)
            reply = script(keys=[*keys, *then.keys], args=[len(argv), *argv, *then.args])
        prev = _text(reply[0])
        if prev == "leased":
            return Claim("running", None, 0, int(reply[1]), None)
        if prev in TERMINAL_STATUSES:
            return Claim(prev, None, 0, None, None)
        return Claim(prev or None, token, int(reply[1]), None, reply[2] if len(reply) > 2 else None)

    def keep_message(self, job_id: str, message: Mapping[str, Any]) -> None:
        """Store the message copy of a job that has none (a raw producer's), so that the due
        sweep can publish it again if the broker's copy is gone."""
        self.client.hsetnx(self.key(job_id), "message", json.dumps(message, separators=(",", ":")))

    def retry_later(
        self,
        job_id: str,
        token: str,
        countdown: float,
        fields: Mapping[str, Any],
        message: Mapping[str, Any],
    ) -> bool:
        """Status ``retrying``, lease released, due ``countdown`` seconds from now (Redis's
        clock) in the due-time index; False if our lease was taken over (nothing written)."""
        pairs = _pairs({**fields, "status": "retrying"})
        msg = json.dumps(message, separators=(",", ":"))
        return bool(
            self._retry(
                keys=[self.key(job_id), LEASE_PREFIX + job_id, PENDING_KEY],
                args=[token, countdown, job_id, msg, len(pairs) // 2, *pairs],
            )
        )

    def throttle_later(
        self,
        job_id: str,
        token: str,
        due_in: float,
        fields: Mapping[str, Any],
        message: Mapping[str, Any],
        *,
        rate_limited: bool = False,
        max_rate_limited: int = 0,
    ) -> int:
        """Status ``throttled``, lease released, due ``due_in`` seconds from now (Redis's
        clock), no attempt spent. ``rate_limited``: a provider 429 sent it back, counted
        in the record's ``rate_limited``. Returns 1 (handed back), 0 (our lease was
        taken over: nothing written) or -2 (it already drew ``max_rate_limited`` 429s:
        nothing written, the caller fails it)."""
        pairs = _pairs({**fields, "status": "throttled"})
        msg = json.dumps(message, separators=(",", ":"))
        args: list[Any] = [token, max(0.0, due_in), job_id, msg, len(pairs) // 2,
                           "1" if rate_limited else "0", max_rate_limited, *pairs]  # fmt: skip
        out = self._throttle(keys=[self.key(job_id), LEASE_PREFIX + job_id, PENDING_KEY], args=args)
        return int(out)

    def release(self, job_id: str, token: str) -> bool:
        """Give up our lease of an unfinished job; False if it was not ours (any more)."""
        return bool(self._release(keys=[LEASE_PREFIX + job_id], args=[token]))

    def update(self, job_id: str, fields: Mapping[str, Any]) -> None:
        """Set fields of a job (status changes that are not terminal)."""
        self.client.hset(self.key(job_id), mapping=cast(dict[Any, Any], encode(fields)))

    def finish(
        self,
        job_id: str,
        fields: Mapping[str, Any],
        bill: ledger.Bill | None = None,
        token: str | None = None,
    ) -> int:
        """Write a terminal status, apply the bill and wake the job's watchers, once per job.

        Returns 1 when written; 0 when the job had already been finished (by a redelivered
        or concurrent copy of its message); -1 when ``token`` no longer holds the job's
        lease (another delivery took it over; the job is not finished). In both of the
        latter cases nothing was written or billed. Writers without a lease (cancel) pass
        no token: the finished marker alone decides.
        """
        pairs = _pairs(fields)
        keys = [self.key(job_id), FINISHED_PREFIX + job_id, PENDING_KEY, LEASE_PREFIX + job_id,
                WAKE_PREFIX + job_id]  # fmt: skip
        argv: list[Any] = [self.ttl, job_id, token or "", len(pairs) // 2, *pairs]
        if bill is not None:
            keys += [bill.key, *quotas.keys(bill.tenant or DEFAULT_TENANT)]
            argv += [ledger.KEEP_SECONDS, bill.model, bill.tokens, bill.nusd,
                     quotas.KEEP_SECONDS, *bill.pairs]  # fmt: skip
        out = self._finish(keys=keys, args=argv)
        # On a pipeline (cancel's transaction) the reply comes from its execute().
        return int(out) if isinstance(out, int | str | bytes) else cast(int, out)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
