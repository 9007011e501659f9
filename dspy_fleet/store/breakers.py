"""Circuit breakers per model alias, with their state in Redis so the whole fleet shares it.

closed → open after N consecutive provider faults, or a fault rate over a window
(with a minimum number of calls); open fails fast with ``retry_after``; after the
recovery timeout, half-open admits a bounded number of probes; M successes close
it, one failure reopens it. Every transition happens inside one Lua script, so
exactly one process sees (and logs) it. Redis's clock is the only clock.

Every provider call's outcome is recorded, and the record script judges it against
the state at record time, so that under any concurrency the threshold and the rate
count every call. The worker records each provider call's outcome the moment the
provider answered (DSPy's LM-call callback, before any parsing), so "N in a row" is
N faults recorded one after another with no success between them: the order the
provider's answers came back, not the order the jobs were admitted (under load the
requests leave the workers in nearly random order). A fault whose call saw a success
recorded while it was in flight starts a new run (see _RECORD_FUNCTION), and a run of
N faults recorded while other calls are still in flight opens the breaker only once it
has stood ``settle_seconds`` with no success recorded (or the calls in flight ended):
their successes may have been answered between its faults and merely recorded after
them. Reads
(/ready, the worker's gauge) show an open breaker as half-open once its recovery
window has passed, with no call needed to move it.

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

from dspy_fleet.store.jobs import LuaCall

log = logging.getLogger("dspy_fleet.breaker")

PREFIX = "dspy_fleet:breaker:"
STATES = {"closed": 0, "open": 1, "half_open": 2}

# Each admitted call gets a number (the hash's `seq`), in the order calls were let
# through. The worker no longer judges runs by it: between admission and the request
# (DSPy formats the prompt, dozens of threads share the GIL) the order is scrambled, so
# the provider's faults land on near-random admission numbers. Outcomes recorded
# without a number are judged in record order (see _RECORD_FUNCTION).
#
# K: state hash, window hash prefix, set of faulted call numbers, calls in flight (a
# sorted set: admission number -> admission time). A: recovery s, half-open max probes,
# window s.
# Returns {allowed 0/1, state, retry_after ms, transition or '', faults in a row, call
# number (0 when not admitted), successes recorded so far (the `oks` counter)}.
# Closed, the call is counted into the failure-rate window now, its fault (if any) when
# recorded: a rate over recorded outcomes alone would be inflated during a burst, whose
# faults are recorded before its successes. A run of faults that has stood its settle time
# (`opens_at`, see _RECORD_FUNCTION) opens the breaker here, refusing the call.
# The one opening, from any state: K as below, the time, the recovery window s.
_OPEN_FUNCTION = """
local function breaker_open(K, now, recovery)
  redis.call('HSET', K[1], 'state', 'open', 'opened_at', now,
             'recovers_at', now + recovery, 'consecutive', 0)
  redis.call('HDEL', K[1], 'opens_at')
  redis.call('DEL', K[3])
end
"""
_ALLOW_FUNCTION = (
    _OPEN_FUNCTION
    + """
local function breaker_allow(K, A)
  local t = redis.call('TIME')
  local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
  local state = redis.call('HGET', K[1], 'state') or 'closed'
  local transition = ''
  if state == 'open' then
    local opened = tonumber(redis.call('HGET', K[1], 'opened_at') or '0')
    local wait = opened + tonumber(A[1]) - now
    if wait > 0 then return {0, 'open', math.ceil(wait * 1000), '', 0, 0, 0} end
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
    if probes >= tonumber(A[2]) then return {0, 'half_open', 1000, transition, 0, 0, 0} end
    redis.call('HINCRBY', K[1], 'probes', 1)
    return {1, 'half_open', 0, transition, 0, redis.call('HINCRBY', K[1], 'seq', 1), 0}
  end
  local due = tonumber(redis.call('HGET', K[1], 'opens_at') or '0')
  if due > 0 and now >= due then
    breaker_open(K, now, tonumber(A[1]))
    return {0, 'open', math.ceil(tonumber(A[1]) * 1000), 'closed->open', 0, 0, 0}
  end
  local window = tonumber(A[3])
  local cur = K[2] .. math.floor(now / window)
  redis.call('HINCRBY', cur, 'calls', 1)
  redis.call('EXPIRE', cur, window * 2 + 1)
  local run = tonumber(redis.call('HGET', K[1], 'consecutive') or '0')
  local seq = redis.call('HINCRBY', K[1], 'seq', 1)
  redis.call('ZADD', K[4], now, seq)
  return {1, 'closed', 0, transition, run, seq,
          tonumber(redis.call('HGET', K[1], 'oks') or '0')}
end
"""
)
_ALLOW = _ALLOW_FUNCTION + "return breaker_allow(KEYS, ARGV)\n"

# Every provider call's outcome, judged against the state *now* (not when the call
# started: a burst of calls that all started on a clean breaker must still have its
# successes counted, or its failures alone would open it).
# K: state hash, window hash prefix, set of faulted call numbers, calls in flight. A: ok
# 0/1, failure threshold, rate, min calls, window s, success threshold, recovery s, call
# number, uncounted 0/1 (a call its admission did not count into the rate window: a job's
# second LM call, or one admitted while the breaker store was down; counted now),
# successes recorded when the call was admitted (its Decision.oks; -1: unknown), the
# admission number this outcome ends (0: none), settle s, longest flight s.
# Call number 0 (what the worker sends): the outcome is numbered in record order, here,
# and "in a row" is the faults recorded since the last recorded success (the
# `consecutive` field): the order the provider answered, as far as the worker can see
# it (each outcome is recorded as the LM call returns). That order is exact only to
# the worker's scheduling: a burst's answers come back within a millisecond of each
# other, a fault's path is shorter than a success's, and which thread records first is
# up to the GIL (measured: 150 answers in ~50 ms, faults recorded in clusters). So a
# fault whose call saw a success recorded while it was in flight starts a new run: the
# provider was answering during that call, and that success may have been answered
# before it. A provider failing every call records no success: its faults still open
# the breaker after exactly N.
# A call number > 0 is an admission number: the run is then the faulted numbers
# consecutive with it, whatever order they are recorded in.
# Settling: the seen rule covers successes recorded *before* a fault; a success answered
# between two faults can also be recorded *after* them (its path is longer, and a
# 150-thread worker on a busy CPU delays it further: observed in CI, the first three
# outcomes of a burst recorded were all faults). So a run reaching N while other calls
# are in flight (admitted, outcome not yet recorded) does not open the breaker at once:
# it stamps `opens_at` = now + settle s, a success recorded before then clears it, and
# the first fault or admission after it opens the breaker. With nothing else in flight
# the order is not in doubt and N faults open it at once (a provider failing every call
# of a burst: its last fault ends the flight). Calls whose outcome never comes (a killed
# worker) leave the in-flight set after the longest flight, the job's time limit.
# Returns {state, transition or ''}.
# The rate is over the current and the previous bucket: calls admitted, faults recorded.
# Calls are counted at admission, not here: a fault can come back long before the
# successes of calls sent with it (a provider failing fast), and a rate over outcomes
# recorded so far would be inflated during a burst.
_RECORD_FUNCTION = (
    _OPEN_FUNCTION
    + """
local function breaker_record(K, A)
  local t = redis.call('TIME')
  local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
  local ok = A[1] == '1'
  if A[11] ~= '0' then redis.call('ZREM', K[4], A[11]) end
  local state = redis.call('HGET', K[1], 'state') or 'closed'
  local window = tonumber(A[5])
  local bucket = math.floor(now / window)
  local cur, prev = K[2] .. bucket, K[2] .. (bucket - 1)
  local function open(transition)
    breaker_open(K, now, tonumber(A[7]))
    return {'open', transition}
  end
  -- Open: the verdict is in; late outcomes of calls admitted before it opened change
  -- nothing (the recovery window decides when to try again).
  if state == 'open' then return {'open', ''} end
  if state == 'half_open' then
    if not ok then return open('half_open->open') end
    local s = redis.call('HINCRBY', K[1], 'successes', 1)
    if s >= tonumber(A[6]) then
      redis.call('HSET', K[1], 'state', 'closed', 'consecutive', 0)
      redis.call('HDEL', K[1], 'opens_at')
      -- A fresh start: the failures that opened it must not count against it again.
      redis.call('DEL', cur, prev, K[3])
      return {'closed', 'half_open->closed'}
    end
    return {'half_open', ''}
  end
  if A[9] == '1' then
    redis.call('HINCRBY', cur, 'calls', 1)
    redis.call('EXPIRE', cur, window * 2 + 1)
  end
  if ok then
    -- Ends a record-order run; a numbered success is simply not in the faulted set.
    redis.call('HSET', K[1], 'consecutive', 0)
    redis.call('HDEL', K[1], 'opens_at')
    redis.call('HINCRBY', K[1], 'oks', 1)
    return {'closed', ''}
  end
  redis.call('HINCRBY', cur, 'failures', 1)
  redis.call('EXPIRE', cur, window * 2 + 1)
  local seq = tonumber(A[8])
  local need = tonumber(A[2])
  local run
  if seq <= 0 then
    -- Numbered in record order: consecutive numbers all faulted = the faults recorded
    -- since the last success, so a counter is the whole run.
    local seen = tonumber(A[10])
    if seen >= 0 and tonumber(redis.call('HGET', K[1], 'oks') or '0') > seen then
      run = 1
    else
      run = math.min(tonumber(redis.call('HGET', K[1], 'consecutive') or '0') + 1, need)
    end
  else
    redis.call('ZADD', K[3], seq, seq)
    -- Bounded: numbers far behind the newest can no longer join a run being looked at.
    local newest = tonumber(redis.call('HGET', K[1], 'seq') or '0')
    redis.call('ZREMRANGEBYSCORE', K[3], '-inf', '(' .. (newest - 10000))
    -- The run of consecutive faulted numbers through this one (at most `need` long).
    run = 1
    local j = seq - 1
    while run < need and redis.call('ZSCORE', K[3], j) do run = run + 1; j = j - 1 end
    j = seq + 1
    while run < need and redis.call('ZSCORE', K[3], j) do run = run + 1; j = j + 1 end
  end
  redis.call('HSET', K[1], 'consecutive', run)
  local calls, fails = 0, 0
  for _, b in ipairs({cur, prev}) do
    calls = calls + tonumber(redis.call('HGET', b, 'calls') or '0')
    fails = fails + tonumber(redis.call('HGET', b, 'failures') or '0')
  end
  if calls >= tonumber(A[4]) and fails / calls >= tonumber(A[3]) then
    return open('closed->open')
  end
  -- Outcomes that never come (a killed worker): gone after the longest flight.
  redis.call('ZREMRANGEBYSCORE', K[4], '-inf', now - tonumber(A[13]))
  if run >= need then
    local settle = tonumber(A[12])
    if settle <= 0 or redis.call('ZCARD', K[4]) == 0 then return open('closed->open') end
    local due = tonumber(redis.call('HGET', K[1], 'opens_at') or '0')
    if due == 0 then
      redis.call('HSET', K[1], 'opens_at', now + settle)
    elseif now >= due then
      return open('closed->open')
    end
  end
  return {'closed', ''}
end
"""
)
_RECORD = _RECORD_FUNCTION + "return breaker_record(KEYS, ARGV)\n"


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
    # How long a run of failure_threshold faults, recorded while other calls were in
    # flight, must stand with no success recorded before it opens the breaker.
    settle_seconds: float = 2.0


@dataclass(frozen=True)
class Decision:
    """Whether a call may go to the provider now."""

    allowed: bool
    state: str
    retry_after: float = 0.0
    consecutive: int = 0  # provider faults in a row, as of this decision
    call: int = 0  # the call's number in admission order (0: not admitted, or unknown)
    oks: int = -1  # successes the breaker had recorded at admission (-1: unknown)

    @property
    def counted(self) -> bool:
        """Whether the admission counted the call into the rate window (not when the
        breaker store was unreachable: such a call is counted when recorded)."""
        return self.call > 0


class BreakerBoard:
    """All breakers of the fleet, read and written through Redis."""

    def __init__(self, client: redis.Redis, policies: dict[str, BreakerPolicy],
                 max_call_seconds: float = 300.0) -> None:  # fmt: skip
        """``max_call_seconds``: the longest a provider call can be in flight (the job's
        hard time limit); an admitted call not heard of after it counts as ended."""
        self.client = client
        self.policies = policies
        self.max_call_seconds = max_call_seconds
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
            return Decision(True, "closed")  # call 0: numbered when its outcome is recorded
        return self.decide(model, reply)

    def allow_call(self, model: str) -> LuaCall:
        """:meth:`allow` as a Lua call that another script can make (the worker's job
        start: one round trip claims the job and asks the breaker); see :meth:`decide`."""
        p = self._policy(model)
        return LuaCall(_ALLOW_FUNCTION, "breaker_allow", _keys(model),
                       [p.recovery_seconds, p.half_open_max_calls, p.window_seconds])  # fmt: skip

    def decide(self, model: str, reply: list[Any]) -> Decision:
        """The Decision in an allow reply; a transition it made is logged and shown here."""
        allowed, state, wait_ms, transition, consecutive, call, oks = reply
        state = _text(state)
        self._transitioned(model, _text(transition), state)
        return Decision(bool(allowed), state, wait_ms / 1000.0, int(consecutive), int(call),
                        int(oks) if allowed else -1)  # fmt: skip

    def record(self, model: str, ok: bool, call: int = 0, uncounted: bool = False,
               seen: int = -1, admitted: int = 0) -> str:  # fmt: skip
        """Report a provider call's outcome (ok=False only for provider faults; a bad
        request is the provider answering, so ok=True). Returns the new state.

        ``call`` 0 (the worker's way): judged in record order, so record each outcome as
        the provider's answer arrives; an admission number (Decision.call) judges runs in
        admission order instead. ``uncounted``: the call was not counted into the rate
        window when admitted (a second LM call of one job; the store was down).
        ``seen``: the call's Decision.oks (a success recorded since breaks a run).
        ``admitted``: the admission (Decision.call) this outcome ends, so that it no longer
        counts as in flight; a numbered ``call`` ends its own."""
        lua = self.record_call(model, ok, call, uncounted, seen, admitted)
        try:
            reply = self._redis_guard.call(self._record, keys=lua.keys, args=lua.args)
        except (redis.RedisError, CircuitBreakerError) as exc:
            log.warning("breaker store unavailable; outcome not recorded: %s", exc)
            return "closed"
        return self.recorded(model, reply)

    def record_call(self, model: str, ok: bool, call: int = 0, uncounted: bool = False,
                    seen: int = -1, admitted: int = 0) -> LuaCall:  # fmt: skip
        """:meth:`record` as a Lua call that another script can make (e.g. the job's
        finish, saving the round trip); see :meth:`recorded` for its reply."""
        p = self._policy(model)
        args = ["1" if ok else "0", p.failure_threshold, p.failure_rate, p.min_calls,
                p.window_seconds, p.success_threshold, p.recovery_seconds, call,
                "1" if uncounted else "0", seen, admitted or call, p.settle_seconds,
                self.max_call_seconds]  # fmt: skip
        return LuaCall(_RECORD_FUNCTION, "breaker_record", _keys(model), args)

    def release(self, model: str, admitted: int) -> None:
        """An admitted call that never reached the provider (throttled, out of budget, a
        429): it is no longer in flight. Best effort: the in-flight set forgets it after
        ``max_call_seconds`` anyway."""
        try:
            self._redis_guard.call(self.client.zrem, _keys(model)[3], admitted)
        except (redis.RedisError, CircuitBreakerError) as exc:
            log.warning("breaker store unavailable; admission %s not released: %s",
                        admitted, exc)  # fmt: skip

    def recorded(self, model: str, reply: list[Any]) -> str:
        """The state in a record reply; a transition it made is logged here."""
        state, transition = _text(reply[0]), _text(reply[1])
        self._transitioned(model, transition, state)
        return state

    def _transitioned(self, model: str, transition: str, state: str) -> None:
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


def _keys(model: str) -> list[str]:
    """A breaker's keys: state hash, rate-window prefix, faulted numbers, calls in flight."""
    base = PREFIX + model
    return [base, base + ":w:", base + ":faults", base + ":flight"]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def read_states(client: redis.Redis, models: list[str]) -> dict[str, str]:
    """The shared state of each model's breaker (closed when never used); one round-trip.

    An open breaker whose recovery window has passed (on Redis's clock) reads as
    half_open, though no call has come to make the move yet: a healthy provider
    must not look down on /ready and the gauge until the next request. Likewise a
    closed one whose run of faults has stood its settle time reads open.
    """
    pipe = client.pipeline(transaction=False)
    pipe.time()
    for m in models:
        pipe.hmget(PREFIX + m, "state", "recovers_at", "opens_at")
    (seconds, micros), *replies = pipe.execute()
    now = seconds + micros / 1e6
    states = {}
    for model, (state, recovers_at, opens_at) in zip(models, replies, strict=True):
        state = _text(state) if state else "closed"
        if state == "closed" and opens_at is not None and now >= float(_text(opens_at)):
            state = "open"
        # An opening written before recovers_at existed stays open until a call moves it.
        if state == "open" and recovers_at is not None and now >= float(_text(recovers_at)):
            state = "half_open"
        states[model] = state
    return states
