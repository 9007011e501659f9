"""Webhook delivery state in Redis: the due-time index, each callback's lease and attempts.

A callback is due when its job (or batch) ends: the script that ends a job adds
``job:<id>`` (and, for the last item of a batch with a callback, ``batch:<id>``) to the
index ``dspy_fleet:callbacks`` (dspy_fleet/store/jobs.py), scored now. Its state lives on
the record it reports (the job's hash, or the batch's metadata hash), in the fields
``callback_status`` (pending → delivered | failed), ``callback_attempts`` (attempts
started), ``callback_last_error`` and ``callback_first_at`` (first attempt, Redis clock).

Who does what (worker/webhooks.py):
- the callback sweep (every worker that consumes ``callbacks``) takes what is due, pushes
  its score ``HOLD_SECONDS`` ahead (if its message is lost, it is published again then) and
  publishes one delivery task per entry, naming the attempt it is for;
- the delivery task claims that attempt under a lease (:meth:`CallbackStore.claim`): only
  if the callback is neither delivered nor failed, that attempt was not started yet, and no
  other delivery holds the lease. Duplicated or redelivered tasks find one of these and do
  nothing;
- after the POST, :meth:`CallbackStore.settle` records the outcome, fenced by the lease:
  delivered (out of the index, for good), retry (re-scored at the backoff's due time), or
  failed (the retry budget is spent, or the URL or secret can never work).

Exactly once: "delivered" is written atomically with the lease check, and every later
claim sees it. The one window left is a worker that dies (or overruns its lease) after the
receiver answered 2xx and before settle: the attempt is then made again, with the same
``X-Fleet-Delivery-Id``, so a receiver that dedupes on it sees the callback once.
"""

from __future__ import annotations

import uuid
from typing import Any, NamedTuple

import redis

from dspy_fleet.store.jobs import BATCH_PREFIX, CALLBACKS_KEY, FINISHED_PREFIX, KEY_PREFIX

LEASE_PREFIX = "dspy_fleet:callback_lease:"
# A failing receiver host: {until: next probe (Redis clock), fails, error}.
HOST_PREFIX = "dspy_fleet:callback_host:"
# A taken entry's score meanwhile: if its task is lost (or waits in a long queue) it is
# published again this much later; a duplicate task is harmless (claim refuses it).
HOLD_SECONDS = 60.0
BATCH = 500  # entries one take returns
_NAMESPACE = uuid.UUID("a6f0c1d2-7b3e-4c59-8e21-3d4f5a6b7c80")

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
"""

# A receiver's host (scheme://host:port as the URL names it) that keeps failing is probed,
# not hammered: while its "until" lies ahead, its callbacks wait in the index (no task, no
# connection) and show its last error; when it passes, one callback goes as the probe. A
# probe that fails pushes "until" out (backoff per host); one that succeeds clears it.
_HOST_OF = """
local function host_key(url)
  return HOSTS .. string.lower(string.match(url or '', '^(%a+://[^/?#]+)') or '')
end
"""

# Take what is due. KEYS: index. ARGV: limit, hold s, job prefix, batch prefix, probe hold
# s, budget s. Returns {member, attempt}... (attempt = attempts started + 1, the one to make).
_TAKE = (
    _NOW
    + f"local HOSTS = '{HOST_PREFIX}'\n"
    + _HOST_OF
    + """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
local out = {}
for _, member in ipairs(due) do
  local kind, id = string.match(member, '^(%a+):(.+)$')
  local hash = nil
  if kind == 'job' then hash = ARGV[3] .. id elseif kind == 'batch' then hash = ARGV[4] .. id end
  local f = {}
  if hash then
    f = redis.call('HMGET', hash, 'callback_status', 'callback_attempts', 'callback_url',
                   'callback_first_at')
  end
  if not f[3] or f[1] == 'delivered' or f[1] == 'failed' then
    redis.call('ZREM', KEYS[1], member)
  else
    local hk = host_key(f[3])
    local h = redis.call('HMGET', hk, 'until', 'error')
    local probe_at = tonumber(h[1] or '0')
    if h[1] and probe_at > now then
      -- Its receiver is failing: wait for the host's next probe, within the budget.
      local first = tonumber(f[4] or '')
      if not first then
        first = now
        redis.call('HSET', hash, 'callback_first_at', string.format('%.6f', now))
      end
      if now > first + tonumber(ARGV[6]) then
        redis.call('HSET', hash, 'callback_status', 'failed',
                   'callback_last_error', h[2] or 'the receiver kept failing')
        redis.call('ZREM', KEYS[1], member)
      else
        if h[2] then redis.call('HSET', hash, 'callback_last_error', h[2]) end
        redis.call('ZADD', KEYS[1], probe_at, member)
      end
    else
      -- This one goes; if its host is failing, as the probe, and the others wait for it.
      if h[1] then
        redis.call('HSET', hk, 'until', string.format('%.6f', now + tonumber(ARGV[5])))
      end
      redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), member)
      out[#out + 1] = {member, tonumber(f[2] or '0') + 1}
    end
  end
end
return out
"""
)

# Claim attempt ARGV[2] of a callback. KEYS: record hash, lease, index.
# ARGV: member, attempt, token, lease ms.
# Returns {'go', url, tenant, api_url} | {'done'} | {'stale'} | {'leased'}.
_CLAIM = (
    _NOW
    + """
local f = redis.call('HMGET', KEYS[1], 'callback_status', 'callback_attempts', 'callback_url',
                     'tenant', 'api_url')
if not f[3] or f[1] == 'delivered' or f[1] == 'failed' then
  redis.call('ZREM', KEYS[3], ARGV[1])
  return {'done'}
end
if tonumber(f[2] or '0') >= tonumber(ARGV[2]) then return {'stale'} end
if not redis.call('SET', KEYS[2], ARGV[3], 'NX', 'PX', ARGV[4]) then return {'leased'} end
redis.call('HSET', KEYS[1], 'callback_attempts', ARGV[2], 'callback_status', 'pending')
redis.call('HSETNX', KEYS[1], 'callback_first_at', string.format('%.6f', now))
-- Not looked at again by the sweep while the attempt may still run.
redis.call('ZADD', KEYS[3], now + tonumber(ARGV[4]) / 1000 + 5, ARGV[1])
return {'go', f[3], f[4] or '', f[5] or ''}
"""
)

# Record an attempt's outcome, if we still hold its lease. KEYS: record hash, lease, index.
# ARGV: member, token, outcome (delivered | retry | failed | unready | busy), error, delay s,
# budget s, host backoff base s, host backoff cap s, whether the receiver failed (1/0).
# Returns the outcome written ('' when the lease was lost).
_SETTLE = (
    _NOW
    + f"local HOSTS = '{HOST_PREFIX}'\n"
    + _HOST_OF
    + """
if redis.call('GET', KEYS[2]) ~= ARGV[2] then return '' end
local hk = host_key(redis.call('HGET', KEYS[1], 'callback_url'))
if ARGV[3] == 'delivered' then
  redis.call('DEL', hk)
elseif ARGV[9] == '1' then
  local fails = redis.call('HINCRBY', hk, 'fails', 1)
  local wait = math.min(tonumber(ARGV[8]), tonumber(ARGV[7]) * 2 ^ (fails - 1))
  redis.call('HSET', hk, 'until', string.format('%.6f', now + wait), 'error', ARGV[4])
  redis.call('EXPIRE', hk, math.ceil(tonumber(ARGV[6]) + tonumber(ARGV[8])))
end
redis.call('DEL', KEYS[2])
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('ZREM', KEYS[3], ARGV[1])
  return 'failed'
end
local outcome = ARGV[3]
if outcome == 'unready' or outcome == 'busy' then
  -- Not an attempt: a batch whose counter ran ahead of its items (see jobs.py), or a
  -- worker whose delivery slots were all taken. Looked at again in ARGV[5] s (a batch
  -- item that ends meanwhile makes it due at once; a host's probe is let through again).
  if redis.call('HINCRBY', KEYS[1], 'callback_attempts', -1) <= 0 then
    redis.call('HDEL', KEYS[1], 'callback_first_at')  -- the budget starts at a real attempt
  end
  redis.call('ZADD', KEYS[3], now + tonumber(ARGV[5]), ARGV[1])
  if outcome == 'busy' and redis.call('EXISTS', hk) == 1 then
    redis.call('HSET', hk, 'until', string.format('%.6f', now + tonumber(ARGV[5])))
  end
  return outcome
end
if ARGV[4] ~= '' then redis.call('HSET', KEYS[1], 'callback_last_error', ARGV[4]) end
if outcome == 'delivered' then
  redis.call('HSET', KEYS[1], 'callback_status', 'delivered')
  redis.call('ZREM', KEYS[3], ARGV[1])
  return outcome
end
local first = tonumber(redis.call('HGET', KEYS[1], 'callback_first_at') or now)
if outcome == 'retry' and now + tonumber(ARGV[5]) <= first + tonumber(ARGV[6]) then
  redis.call('ZADD', KEYS[3], now + tonumber(ARGV[5]), ARGV[1])
  return outcome
end
redis.call('HSET', KEYS[1], 'callback_status', 'failed')
redis.call('ZREM', KEYS[3], ARGV[1])
return 'failed'
"""
)

# A batch whose items were not all created by it (an item naming an existing job, or one
# Redis refused) counts those now: a job already ended, or refused, counts as ended; a
# running one is adopted (its end counts). KEYS: batch hash, index. ARGV: batch id,
# finished-marker prefix, job prefix, n refused, job ids.
_ADOPT = (
    _NOW
    + """
local ended = tonumber(ARGV[4])
for i = 5, #ARGV do
  local id = ARGV[i]
  if redis.call('EXISTS', ARGV[2] .. id) == 1 or redis.call('EXISTS', ARGV[3] .. id) == 0 then
    ended = ended + 1  -- ended already (or its record is gone: it never will)
  elseif redis.call('HSETNX', ARGV[3] .. id, 'batch_id', ARGV[1]) == 0
         and redis.call('HGET', ARGV[3] .. id, 'batch_id') ~= ARGV[1] then
    ended = ended + 1  -- another batch's item: its end counts there, not here
  end
end
local total = redis.call('HINCRBY', KEYS[1], 'ended', ended)
local expected = tonumber(redis.call('HGET', KEYS[1], 'expected') or '0')
if total >= expected then redis.call('ZADD', KEYS[2], now, 'batch:' .. ARGV[1]) end
return total
"""
)


class Claim(NamedTuple):
    """What :meth:`CallbackStore.claim` found."""

    outcome: str  # go | done | stale | leased
    token: str | None = None
    url: str | None = None
    tenant: str | None = None
    api_url: str | None = None


def split_member(member: str) -> tuple[str, str]:
    """``"job:<id>"`` → ("job", id); ``"batch:<id>"`` → ("batch", id); ValueError otherwise."""
    kind, _, ident = member.partition(":")
    if kind not in ("job", "batch") or not ident:
        raise ValueError(f"not a callback: {member!r}")
    return kind, ident


def record_key(member: str) -> str:
    """The Redis hash that holds a callback's record (the job, or the batch's metadata)."""
    kind, ident = split_member(member)
    return (KEY_PREFIX if kind == "job" else BATCH_PREFIX) + ident


def delivery_id(member: str) -> str:
    """The X-Fleet-Delivery-Id of a callback: the same for each of its attempts."""
    return str(uuid.uuid5(_NAMESPACE, member))


class CallbackStore:
    """The due-time index and the per-callback state; each method is one script call."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self._take = client.register_script(_TAKE)
        self._claim = client.register_script(_CLAIM)
        self._settle = client.register_script(_SETTLE)
        self._adopt = client.register_script(_ADOPT)

    def take_due(
        self, budget: float, probe_hold: float, limit: int = BATCH, hold: float = HOLD_SECONDS
    ) -> list[tuple[str, int]]:
        """(member, attempt) of up to ``limit`` due callbacks, each held ``hold`` seconds.

        Callbacks to a failing receiver host wait for its next probe instead (one of them
        is the probe, its host then held ``probe_hold`` s), and fail once ``budget`` s have
        passed since their first attempt (or wait)."""
        reply = self._take(
            keys=[CALLBACKS_KEY],
            args=[limit, hold, KEY_PREFIX, BATCH_PREFIX, probe_hold, budget],
        )
        return [(_text(r[0]), int(r[1])) for r in reply]

    def claim(self, member: str, attempt: int, lease_seconds: float) -> Claim:
        """Start attempt ``attempt`` of ``member`` under a lease, if it is this attempt's turn."""
        token = uuid.uuid4().hex
        reply = self._claim(
            keys=[record_key(member), LEASE_PREFIX + member, CALLBACKS_KEY],
            args=[member, attempt, token, max(1, int(lease_seconds * 1000))],
        )
        outcome = _text(reply[0])
        if outcome != "go":
            return Claim(outcome)
        url, tenant, api_url = (_text(r) for r in reply[1:4])
        return Claim(outcome, token, url, tenant or None, api_url or None)

    def settle(
        self, member: str, token: str, outcome: str, *, error: str | None = None,
        delay: float = 0.0, budget: float = 0.0, host_backoff: tuple[float, float] = (1, 300),
    ) -> str:  # fmt: skip
        """Record an attempt: ``delivered``, ``retry`` in ``delay`` s (``failed`` instead
        when that is past ``budget`` s from the first attempt), ``failed`` or ``unready``.
        A ``retry`` also marks the receiver's host failing for the next
        ``host_backoff`` (base, cap) step; ``delivered`` clears it. Returns what was
        written; '' when our lease was lost (nothing written)."""
        host_failed = "1" if outcome == "retry" else "0"
        reply = self._settle(
            keys=[record_key(member), LEASE_PREFIX + member, CALLBACKS_KEY],
            args=[member, token, outcome, error or "", delay, budget, *host_backoff, host_failed],
        )
        return _text(reply)

    def adopt(self, batch_id: str, existing: list[str], refused: int) -> int:
        """Count a new batch's items it did not create (see _ADOPT); returns items ended."""
        if not existing and not refused:
            return 0
        return int(
            self._adopt(
                keys=[BATCH_PREFIX + batch_id, CALLBACKS_KEY],
                args=[batch_id, FINISHED_PREFIX, KEY_PREFIX, refused, *existing],
            )
        )


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
