"""Per-program outcome samples and feedback: what the A/B report (GET
/v1/programs/<name>/report) reads. Never import dspy here: the API uses this module.

Two records, both per program, both trimmed to a retention window and a size cap:

- **Outcomes** ``dspy_fleet:outcomes:<program>``: a sorted set, scored by the time the job
  finished (Redis's clock, seconds), one member per job that ran to ``succeeded`` or
  ``failed`` (cancelled jobs never ran: not a sample)::

      <job_id>|<variant or none>|<status>|<latency ms or ''>|<cost USD or ''>|<cached 0/1>|<tenant>
      |<program version or ''>

  (members written before versions were recorded have no last part: version unknown).

  Written by the script that finishes the job (store/jobs.py ``_FINISH``, and ``_CREATE``
  for a job born finished from the API's cache), in the same atomic step as its bill, so
  a job is sampled exactly once. Latency and cost are the job's cost record's
  ``latency_ms`` and ``cost_usd`` (empty when unknown). Names are restricted to
  ``[\\w.:-]``, so ``|`` never occurs inside a part.
- **Feedback**: on the job's own hash, field ``feedback:<source>`` (the posted JSON, kept as
  long as the job); and per program, a sorted set ``dspy_fleet:feedback:<program>`` of
  ``<job_id>|<source>`` scored by the time it was (last) posted, beside a hash
  ``dspy_fleet:feedback_scores:<program>`` from the same member to
  ``<score>|<variant>|<tenant>``.

Retention: KEEP_DAYS days (entries older are dropped as new ones arrive, and an idle
program's keys expire after it), and at most CAP entries per program and record (the
oldest go first). A report's window therefore never reaches back further than either.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

import redis

from dspy_fleet.contract import RAN_STATUSES
from dspy_fleet.store.traces import KEEP_TRACE

OUTCOMES_PREFIX = "dspy_fleet:outcomes:"
FEEDBACK_PREFIX = "dspy_fleet:feedback:"
SCORES_PREFIX = "dspy_fleet:feedback_scores:"
FIELD_PREFIX = "feedback:"  # on the job's hash: one field per source
KEEP_DAYS = 30
KEEP_SECONDS = KEEP_DAYS * 86400
CAP = 100_000
# At most this many expired feedback entries are dropped per post (bounded work).
_TRIM_BATCH = 100
SEP = "|"

# Defines record_outcome(job_key, job_id): the finish scripts call it once the job's
# terminal fields are written (store/jobs.py).
RECORD_OUTCOME = (
    f"""
local OUTCOMES, OUT_KEEP, OUT_CAP = '{OUTCOMES_PREFIX}', {KEEP_SECONDS}, {CAP}
local SAMPLED = {{{", ".join(f"{s} = true" for s in sorted(RAN_STATUSES))}}}
"""
    + """
local function record_outcome(job_key, job_id)
  local f = redis.call('HMGET', job_key, 'program', 'variant', 'status', 'cost', 'tenant',
                    'program_version')
  if not f[1] or not SAMPLED[f[3]] then return end
  local latency, usd, cached = '', '', '0'
  if f[4] then
    local ok, cost = pcall(cjson.decode, f[4])
    if ok and type(cost) == 'table' then
      if type(cost.latency_ms) == 'number' then latency = string.format('%.2f', cost.latency_ms) end
      if type(cost.cost_usd) == 'number' then usd = string.format('%.10g', cost.cost_usd) end
      if cost.cached == true then cached = '1' end
    end
  end
  local t = redis.call('TIME')
  local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
  local key = OUTCOMES .. f[1]
  redis.call('ZADD', key, now, table.concat({job_id, f[2] or 'none', f[3], latency, usd,
             cached, f[5] or '', f[6] or ''}, '|'))
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now - OUT_KEEP)
  redis.call('ZREMRANGEBYRANK', key, 0, -(OUT_CAP + 1))
  redis.call('EXPIRE', key, OUT_KEEP)
end
"""
)

# Store one source's feedback on a succeeded job, replacing that source's earlier one.
# The feedback is also copied onto the job's kept trace, keeping its pending trace first
# (store/traces.py: trace_feedback), so that examples exported later carry it.
# KEYS: job, feedback zset, scores hash. ARGV: job id, source, JSON, score, keep s, cap,
# trim batch, the status succeeded, program, trace ttl s, trace cap.
# Returns {'missing'} | {'status', <status>} | {'ok', replaced 0/1, variant, traced 0/1}.
_POST = (
    KEEP_TRACE
    + """
local f = redis.call('HMGET', KEYS[1], 'status', 'variant', 'tenant')
if not f[1] then return {'missing'} end
if f[1] ~= ARGV[8] then return {'status', f[1]} end
local field = 'feedback:' .. ARGV[2]
local replaced = redis.call('HEXISTS', KEYS[1], field)
redis.call('HSET', KEYS[1], field, ARGV[3])
local member = ARGV[1] .. '|' .. ARGV[2]
local variant = f[2] or 'none'
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
redis.call('ZADD', KEYS[2], now, member)
redis.call('HSET', KEYS[3], member, ARGV[4] .. '|' .. variant .. '|' .. (f[3] or ''))
local keep, cap, batch = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local old = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now - keep, 'LIMIT', 0, batch)
local excess = redis.call('ZCARD', KEYS[2]) - #old - cap
if excess > 0 then
  for _, m in ipairs(redis.call('ZRANGE', KEYS[2], #old, #old + math.min(excess, batch) - 1)) do
    old[#old + 1] = m
  end
end
if #old > 0 then
  redis.call('ZREM', KEYS[2], unpack(old))
  redis.call('HDEL', KEYS[3], unpack(old))
end
redis.call('EXPIRE', KEYS[2], keep)
redis.call('EXPIRE', KEYS[3], keep)
local traced = trace_feedback(ARGV[9], ARGV[1], field, ARGV[3], tonumber(ARGV[10]),
                              tonumber(ARGV[11]))
return {'ok', replaced, variant, traced}
"""
)


@dataclass(frozen=True)
class Outcome:
    """One sampled job: its variant, status, latency (ms) and cost (USD), None if unknown."""

    job_id: str
    variant: str
    status: str
    latency_ms: float | None
    cost_usd: float | None
    cached: bool
    tenant: str
    program_version: str | None = None


@dataclass(frozen=True)
class Score:
    """One source's feedback score on one job."""

    job_id: str
    source: str
    score: float
    variant: str
    tenant: str


@dataclass(frozen=True)
class Posted:
    """What :meth:`FeedbackStore.post` did: ``status`` 'ok', 'missing' or the job's status
    (not succeeded: nothing stored); ``replaced`` when this source had posted before;
    ``traced`` when the job's trace is kept with the feedback on it."""

    status: str
    replaced: bool = False
    variant: str | None = None
    traced: bool = False


def _opt(text: str) -> float | None:
    return float(text) if text else None


def parse_outcome(member: str) -> Outcome | None:
    """An outcomes member as an :class:`Outcome` (None for a malformed one)."""
    parts = member.split(SEP)
    if len(parts) not in (7, 8):
        return None
    job_id, variant, status, latency, usd, cached, tenant = parts[:7]
    version = parts[7] if len(parts) == 8 and parts[7] else None
    return Outcome(job_id, variant, status, _opt(latency), _opt(usd), cached == "1", tenant,
                   version)  # fmt: skip


class FeedbackStore:
    """Writes feedback and reads the report's samples; each method is one round trip or
    one pipeline."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self._post = client.register_script(_POST)

    def post(self, job_id: str, program: str, source: str, body: Mapping[str, Any], *,
             trace_ttl_seconds: int = 7 * 86400, trace_cap: int = 10_000) -> Posted:  # fmt: skip
        """Store ``body`` (with its ``score``) as ``source``'s feedback on the job, replacing
        that source's earlier one; only on a succeeded job (else nothing is written). The
        job's trace, kept or pending, is kept with the feedback on it for
        ``trace_ttl_seconds``, among at most ``trace_cap`` of the program's traces."""
        from dspy_fleet.store.jobs import JobStore

        doc = json.dumps(dict(body), separators=(",", ":"))
        out = self._post(
            keys=[JobStore.key(job_id), FEEDBACK_PREFIX + program, SCORES_PREFIX + program],
            args=[job_id, source, doc, repr(float(body["score"])), KEEP_SECONDS, CAP,
                  _TRIM_BATCH, "succeeded", program, trace_ttl_seconds, trace_cap],
        )  # fmt: skip
        status = _text(out[0])
        if status == "ok":
            return Posted("ok", bool(int(out[1])), _text(out[2]), bool(int(out[3])))
        return Posted(_text(out[1]) if status == "status" else "missing")

    def of_job(self, job: Mapping[str, Any]) -> list[dict[str, Any]]:
        """The feedback stored on a job record (as JobStore.get returns it), by source."""
        out = []
        for key, value in sorted(job.items()):
            if key.startswith(FIELD_PREFIX) and isinstance(value, str):
                out.append(json.loads(value))
        return out

    def samples(
        self,
        program: str,
        since: float,
        tenant: str | None = None,
        source: str | None = None,
        version: str | None = None,
    ) -> tuple[list[Outcome], list[Score]]:
        """The program's outcomes of jobs that finished at or after ``since`` (Unix seconds,
        Redis's clock), and the feedback scores on those jobs (``source``: that source's
        only); ``tenant``: that tenant's only; ``version``: jobs that ran that program
        version only."""
        pipe = self.client.pipeline(transaction=False)
        pipe.zrangebyscore(OUTCOMES_PREFIX + program, since, "+inf")
        pipe.zrangebyscore(FEEDBACK_PREFIX + program, since, "+inf")
        raw_outcomes, members = pipe.execute()
        outcomes = [o for m in raw_outcomes if (o := parse_outcome(_text(m))) is not None]
        if tenant is not None:
            outcomes = [o for o in outcomes if o.tenant == tenant]
        if version is not None:
            outcomes = [o for o in outcomes if o.program_version == version]
        window = {o.job_id for o in outcomes}
        members = [_text(m) for m in members]
        if source is not None:
            members = [m for m in members if m.split(SEP, 1)[-1] == source]
        members = [m for m in members if m.split(SEP, 1)[0] in window]
        values: list[Any] = []
        if members:
            values = cast(list[Any], self.client.hmget(SCORES_PREFIX + program, members))
        scores = []
        for member, value in zip(members, values, strict=True):
            if value is None:
                continue
            parts = _text(value).split(SEP)
            job_id, src = member.split(SEP, 1)
            if len(parts) == 3 and (tenant is None or parts[2] == tenant):
                scores.append(Score(job_id, src, float(parts[0]), parts[1], parts[2]))
        return outcomes, scores


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
