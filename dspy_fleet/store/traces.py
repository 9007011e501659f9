"""Program traces: what a program did on one job, kept per program for a while. Never
import dspy here: the API reads this module.

A trace is one JSON document (built by worker/traces.py, already redacted)::

    {"job_id", "program", "variant", "program_version", "tenant", "model", "status",
     "finished_at", "inputs", "outputs", "input_fields", "output_fields", "cached",
     "lm_calls": [{"model", "messages", "outputs", "error"}], "truncated", "redacted"}

Three keys, all on Redis's clock:

- **Kept** ``dspy_fleet:trace:<job_id>``: a hash, field ``trace`` (the JSON above) and one
  field ``feedback:<source>`` per feedback posted on the job (the posted JSON, copied by
  the feedback script), expiring ``ttl_days`` after it was kept.
- **Index** ``dspy_fleet:traces:<program>``: a sorted set of job ids scored by the time
  the trace was kept; at most ``max_traces`` members (the oldest go first, with their
  hashes), none older than the TTL.
- **Pending** ``dspy_fleet:trace_pending:<job_id>``: the trace of a job that was not
  sampled, while ``keep_on_feedback`` is on, for ``feedback_window_hours``; a feedback
  post on the job keeps it (moves it to the kept hash and the index).

The worker hands the trace over on the job's own hash, fields ``trace`` and
``trace_keep`` (:func:`finish_fields`), written by the script that finishes the job;
that script moves them here (:data:`STASH_TRACE`) in the same atomic step, so tracing
costs no round trip of its own.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any, cast

import redis

TRACE_PREFIX = "dspy_fleet:trace:"
INDEX_PREFIX = "dspy_fleet:traces:"
PENDING_PREFIX = "dspy_fleet:trace_pending:"
FEEDBACK_FIELD = "feedback:"
# At most this many expired or excess traces are dropped per keep (bounded work).
_TRIM_BATCH = 100
# Hashes read per pipeline when listing.
_CHUNK = 200

# Defines keep_trace(program, job_id, trace, ttl, cap) and trace_feedback(program, job_id,
# field, doc, ttl, cap): the first keeps a trace (hash, index, trims); the second copies a
# feedback post onto the job's kept trace, keeping its pending trace first if it has one
# (returns 0 when the job has no trace at all). Used by the finish script (via STASH_TRACE)
# and by the feedback script (store/feedback.py).
KEEP_TRACE = (
    f"local TRACE, TRACES, PENDING_TRACE, TRACE_TRIM = '{TRACE_PREFIX}', '{INDEX_PREFIX}', "
    f"'{PENDING_PREFIX}', {_TRIM_BATCH}\n"
    + """
local function keep_trace(program, job_id, trace, ttl, cap)
  local key = TRACE .. job_id
  redis.call('HSET', key, 'trace', trace)
  redis.call('EXPIRE', key, ttl)
  local t = redis.call('TIME')
  local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
  local index = TRACES .. program
  redis.call('ZADD', index, now, job_id)
  local gone = redis.call('ZRANGEBYSCORE', index, '-inf', now - ttl, 'LIMIT', 0, TRACE_TRIM)
  local excess = redis.call('ZCARD', index) - #gone - cap
  if excess > 0 then
    local last = #gone + math.min(excess, TRACE_TRIM) - 1
    for _, m in ipairs(redis.call('ZRANGE', index, #gone, last)) do gone[#gone + 1] = m end
  end
  if #gone > 0 then
    redis.call('ZREM', index, unpack(gone))
    for _, m in ipairs(gone) do redis.call('DEL', TRACE .. m) end
  end
  redis.call('EXPIRE', index, ttl)
end

local function trace_feedback(program, job_id, field, doc, ttl, cap)
  local key = TRACE .. job_id
  if redis.call('EXISTS', key) == 0 then
    local pending = redis.call('GET', PENDING_TRACE .. job_id)
    if not pending then return 0 end
    keep_trace(program, job_id, pending, ttl, cap)
    redis.call('DEL', PENDING_TRACE .. job_id)
  end
  redis.call('HSET', key, field, doc)
  return 1
end
"""
)

# Defines stash_trace(job_key, job_id): moves the trace the worker left on the job's hash
# (fields 'trace' and 'trace_keep': "keep|<ttl s>|<cap>" or "pending|<window s>") to the
# kept or pending key. Called by the finish script after it wrote the job's fields.
STASH_TRACE = (
    KEEP_TRACE
    + """
local function stash_trace(job_key, job_id)
  local f = redis.call('HMGET', job_key, 'program', 'trace', 'trace_keep')
  if not f[2] then return end
  redis.call('HDEL', job_key, 'trace', 'trace_keep')
  local how, a, b = string.match(f[3] or '', '^(%a+)|(%d+)|?(%d*)$')
  if how == 'keep' and f[1] then
    keep_trace(f[1], job_id, f[2], tonumber(a), tonumber(b))
  elseif how == 'pending' then
    redis.call('SET', PENDING_TRACE .. job_id, f[2], 'EX', tonumber(a))
  end
end
"""
)


def finish_fields(doc: str, *, keep: bool, ttl_seconds: int, cap: int,
                  window_seconds: int) -> dict[str, str]:  # fmt: skip
    """The job-hash fields that hand a trace (``doc``: its JSON) to the finish script:
    kept now (``keep``, sampled), else pending for ``window_seconds``."""
    how = f"keep|{ttl_seconds}|{cap}" if keep else f"pending|{window_seconds}"
    return {"trace": doc, "trace_keep": how}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def decode(raw: dict[str, str]) -> dict[str, Any] | None:
    """A kept trace's hash as ``{"trace": {...}, "feedback": [{...}, ...]}`` (feedback by
    source name), or None for a missing or malformed one."""
    doc = raw.get("trace")
    if doc is None:
        return None
    try:
        trace = json.loads(doc)
        feedback = [json.loads(v) for k, v in sorted(raw.items()) if k.startswith(FEEDBACK_FIELD)]
    except ValueError:
        return None
    return {"trace": trace, "feedback": feedback}


class TraceStore:
    """Reads kept traces (the worker writes through the finish script, the feedback post
    through its own); each method is one round trip or a few pipelines."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client

    def get(self, job_id: str) -> dict[str, Any] | None:
        """The job's kept trace with its feedback (see :func:`decode`), or None."""
        raw = cast(dict[Any, Any], self.client.hgetall(TRACE_PREFIX + job_id))
        return decode({_text(k): _text(v) for k, v in raw.items()}) if raw else None

    def pending(self, job_id: str) -> bool:
        """Whether the job's trace waits in its pending slot (tests and diagnostics)."""
        return bool(self.client.exists(PENDING_PREFIX + job_id))

    def scan(
        self,
        program: str,
        since: float,
        *,
        tenant: str | None = None,
        variant: str | None = None,
        version: str | None = None,
    ) -> Iterator[dict[str, Any]]:
        """The program's kept traces kept at or after ``since`` (Unix seconds, Redis's
        clock), oldest first, each as :func:`decode` gives it; ``tenant``, ``variant``
        (``none`` for jobs without one), ``version``: only those."""
        ids = [_text(m) for m in self.client.zrangebyscore(INDEX_PREFIX + program, since, "+inf")]
        for start in range(0, len(ids), _CHUNK):
            pipe = self.client.pipeline(transaction=False)
            for job_id in ids[start : start + _CHUNK]:
                pipe.hgetall(TRACE_PREFIX + job_id)
            for raw in pipe.execute():
                kept = decode({_text(k): _text(v) for k, v in raw.items()}) if raw else None
                if kept is None:
                    continue  # expired between the index read and this one
                t = kept["trace"]
                if tenant is not None and t.get("tenant") != tenant:
                    continue
                if variant is not None and (t.get("variant") or "none") != variant:
                    continue
                if version is not None and t.get("program_version") != version:
                    continue
                yield kept
