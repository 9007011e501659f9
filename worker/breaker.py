"""Circuit breakers per model alias, with their state in Redis so the whole fleet shares it.

closed → open after N consecutive provider faults, or a fault rate over a window
(with a minimum number of calls); open fails fast with ``retry_after``; after the
recovery timeout, half-open admits a bounded number of probes; M successes close
it, one failure reopens it. Every transition happens inside one Lua script, so
exactly one process sees (and logs) it. Redis's clock is the only clock.

The ``circuitbreaker`` package keeps its state in process memory with a monotonic
clock and has no probe bound, success threshold or rate window, so it cannot be
the shared breaker; it guards the breaker's own Redis calls instead (see
:class:`BreakerBoard`): when Redis is failing, breakers fail *open* (calls go
through) quickly instead of every call waiting on a Redis timeout.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import redis
from circuitbreaker import CircuitBreaker, CircuitBreakerError

from worker import metrics
from worker.jobs import LuaCall

log = logging.getLogger("dspy_fleet.breaker")

PREFIX = "dspy_fleet:breaker:"
STATES = {"closed": 0, "open": 1, "half_open": 2}

# K: state hash, window hash prefix. A: recovery s, half-open max probes, window s.
# Returns {allowed 0/1, state, retry_after ms, transition or '', consecutive failures}.
# Calls are counted into the failure-rate window here, so that a success in the
# common case (closed, no failures pending) needs no second round-trip.
_ALLOW_FUNCTION = """
local function breaker_allow(K, A)
  local t = redis.call('TIME')
  local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
  local state = redis.call('HGET', K[1], 'state') or 'closed'
  local transition = ''
  if state == 'open' then
    local opened = tonumber(redis.call('HGET', K[1], 'opened_at') or '0')
    local wait = opened + tonumber(A[1]) - now
    if wait > 0 then return {0, 'open', math.ceil(wait * 1000), '', 0} end
    state = 'half_open'
    transition = 'open->half_open'
    redis.call('HSET', K[1], 'state', state, 'half_open_at', now, 'probes', 0, 'successes', 0)
  end
  if state == 'half_open' then
    local probes = tonumber(redis.call('HGET', K[1], 'probes') or '0')
    local since = tonumber(redis.call('HGET', K[1], 'half_open_at') or '0')
    -- Probes whose workers died never report back: start a new probe round then.
    if probes >= tonumber(A[2]) and now - since > tonumber(A[1]) then
      probes = 0
      redis.call('HSET', K[1], 'probes', 0, 'successes', 0, 'half_open_at', now)
    end
    if probes >= tonumber(A[2]) then return {0, 'half_open', 1000, transition, 0} end
    redis.call('HINCRBY', K[1], 'probes', 1)
    return {1, 'half_open', 0, transition, 0}
  end
  local window = tonumber(A[3])
  local cur = K[2] .. math.floor(now / window)
  redis.call('HINCRBY', cur, 'calls', 1)
  redis.call('EXPIRE', cur, window * 2 + 1)
  return {1, 'closed', 0, transition, tonumber(redis.call('HGET', K[1], 'consecutive') or '0')}
end
"""
_ALLOW = _ALLOW_FUNCTION + "return breaker_allow(KEYS, ARGV)\n"

# KEYS: state hash, window hash. ARGV: ok 0/1, failure threshold, rate, min calls,
# window s, success threshold. Returns {state, transition or ''}.
_RECORD = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local ok = ARGV[1] == '1'
local state = redis.call('HGET', KEYS[1], 'state') or 'closed'
local window = tonumber(ARGV[5])
local bucket = math.floor(now / window)
local cur = KEYS[2] .. bucket
if not ok then
  redis.call('HINCRBY', cur, 'failures', 1)
  redis.call('EXPIRE', cur, window * 2 + 1)
end
if state == 'half_open' then
  if not ok then
    redis.call('HSET', KEYS[1], 'state', 'open', 'opened_at', now, 'consecutive', 0)
    return {'open', 'half_open->open'}
  end
  local s = redis.call('HINCRBY', KEYS[1], 'successes', 1)
  if s >= tonumber(ARGV[6]) then
    redis.call('HSET', KEYS[1], 'state', 'closed', 'consecutive', 0)
    return {'closed', 'half_open->closed'}
  end
  return {'half_open', ''}
end
if state == 'open' then return {'open', ''} end
if ok then
  redis.call('HSET', KEYS[1], 'consecutive', 0)
  return {'closed', ''}
end
local n = redis.call('HINCRBY', KEYS[1], 'consecutive', 1)
local calls, fails = 0, 0
for _, b in ipairs({cur, KEYS[2] .. (bucket - 1)}) do
  calls = calls + tonumber(redis.call('HGET', b, 'calls') or '0')
  fails = fails + tonumber(redis.call('HGET', b, 'failures') or '0')
end
local by_rate = calls >= tonumber(ARGV[4]) and fails / calls >= tonumber(ARGV[3])
if n >= tonumber(ARGV[2]) or by_rate then
  redis.call('HSET', KEYS[1], 'state', 'open', 'opened_at', now, 'consecutive', 0)
  return {'open', 'closed->open'}
end
return {'closed', ''}
"""


@dataclass(frozen=True)
class BreakerPolicy:
    """Thresholds of one model's breaker."""

    failure_threshold: int = 5
    failure_rate: float = 0.5
    min_calls: int = 20
    window_seconds: int = 60
    recovery_seconds: float = 30.0
    half_open_max_calls: int = 3
    success_threshold: int = 2


@dataclass(frozen=True)
class Decision:
    """Whether a call may go to the provider now."""

    allowed: bool
    state: str
    retry_after: float = 0.0
    consecutive: int = 0  # provider faults in a row, as of this decision

    @property
    def success_matters(self) -> bool:
        """Whether a success must be reported: it closes a half-open breaker or resets a
        run of failures. Closed with no failures pending, it would change nothing."""
        return self.state != "closed" or self.consecutive > 0


class BreakerBoard:
    """All breakers of the fleet, read and written through Redis."""

    def __init__(self, client: redis.Redis, policies: dict[str, BreakerPolicy]) -> None:
        self.client = client
        self.policies = policies
        self._allow = client.register_script(_ALLOW)
        self._record = client.register_script(_RECORD)
        # In-process guard around Redis itself: 3 Redis errors in a row and the
        # breakers stop asking Redis for 5 s (calls are allowed meanwhile).
        self._redis_guard = CircuitBreaker(
            failure_threshold=3, recovery_timeout=5, expected_exception=redis.RedisError,
            name="breaker-store",
        )  # fmt: skip

    def _policy(self, model: str) -> BreakerPolicy:
        return self.policies.get(model) or BreakerPolicy()

    def allow(self, model: str) -> Decision:
        """Ask to call ``model``; open breakers say no, with how long to wait."""
        call = self.allow_call(model)
        try:
            reply = self._redis_guard.call(self._allow, keys=call.keys, args=call.args)
        except (redis.RedisError, CircuitBreakerError) as exc:
            log.warning("breaker store unavailable; allowing the call: %s", exc)
            return Decision(True, "closed")
        return self.decide(model, reply)

    def allow_call(self, model: str) -> LuaCall:
        """:meth:`allow` as a Lua call that another script can make (the worker's job
        start: one round trip claims the job and asks the breaker); see :meth:`decide`."""
        p = self._policy(model)
        return LuaCall(_ALLOW_FUNCTION, "breaker_allow", [PREFIX + model, PREFIX + model + ":w:"],
                       [p.recovery_seconds, p.half_open_max_calls, p.window_seconds])  # fmt: skip

    def decide(self, model: str, reply: list[Any]) -> Decision:
        """The Decision in an allow reply; a transition it made is logged and shown here."""
        allowed, state, wait_ms, transition, consecutive = reply
        state = _text(state)
        self._transitioned(model, _text(transition), state)
        return Decision(bool(allowed), state, wait_ms / 1000.0, int(consecutive))

    def record(self, model: str, ok: bool) -> str:
        """Report a call's outcome (ok=False only for provider faults); returns the new state."""
        p = self._policy(model)
        try:
            state, transition = self._redis_guard.call(
                self._record, keys=[PREFIX + model, PREFIX + model + ":w:"],
                args=["1" if ok else "0", p.failure_threshold, p.failure_rate, p.min_calls,
                      p.window_seconds, p.success_threshold],
            )  # fmt: skip
        except (redis.RedisError, CircuitBreakerError) as exc:
            log.warning("breaker store unavailable; outcome not recorded: %s", exc)
            return "closed"
        state = _text(state)
        self._transitioned(model, _text(transition), state)
        return state

    def _transitioned(self, model: str, transition: str, state: str) -> None:
        metrics.BREAKER_STATE.labels(model).set(STATES.get(state, 0))
        if transition:
            # Exactly one process gets a transition back from the script: logged once.
            level = logging.WARNING if state == "open" else logging.INFO
            log.log(
                level,
                "circuit breaker %s: %s",
                model,
                transition,
                extra={"model": model, "transition": transition, "breaker_state": state},
            )


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def read_states(client: redis.Redis, models: list[str]) -> dict[str, str]:
    """The shared state of each model's breaker (closed when never used); one round-trip."""
    pipe = client.pipeline(transaction=False)
    for m in models:
        pipe.hget(PREFIX + m, "state")
    return {m: _text(s) if s else "closed" for m, s in zip(models, pipe.execute(), strict=True)}
