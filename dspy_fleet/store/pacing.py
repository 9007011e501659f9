"""Fleet-wide pacing to provider limits: requests and tokens per minute, concurrency.

Every limit lives in Redis and runs on Redis's clock, so the whole fleet shares it. A
*scope* is one model alias, or one provider account that several aliases share; a job
passes the limits of each scope its model belongs to.

**Rates** use GCRA (the generic cell rate algorithm, ITU-T I.371; the "virtual
scheduling" form): each limit keeps a theoretical arrival time (TAT). A call costing
``c`` units (1 request, or its estimated tokens) on a limit of ``r`` units per second
with a burst of ``C`` units may go at ``now`` when ``max(TAT, now) + c/r - now <= C/r``,
and then moves the TAT to ``max(TAT, now) + c/r``. The burst holds ``burst_seconds`` of
the rate (default 1 s: providers enforce per-minute limits over shorter periods, e.g.
OpenAI's "Rate limits" guide).

**Pacing, not rejection**: a call that may not go now, but may within ``horizon``
seconds, *books* that slot (the TAT moves as if it went then) and comes back at it; a
booking is honoured without a second check, if the job comes within ``LATE_SECONDS`` of
its slot (later, the slot is gone and it asks again: sending it on top of the slots
booked since would break the rate). A call whose turn is further away waits
*in line* (a sorted set by arrival, first come first served) and is told to come back
a little before the turn its place gives it; it keeps its place each time it comes
back early. So a backlog of thousands is spread over time in arrival order, never
retried in a herd, and only the next ``horizon`` seconds are ever booked: a cut
(below) takes effect within that horizon.

A job's place in line is also pulled forward: whenever the next ``horizon`` seconds
have free slots (the rate grew, or jobs ahead did not come back), the heads of the
lines get their due time in the job store's due-time index set to now, so the due
sweep publishes them at once (dspy_fleet/store/jobs.py, worker/recovery.py).

**Interactive reserve**: an interactive call goes at once while the interactive
bucket (``share`` of the rate, holding ``INTERACTIVE_BURST_SECONDS`` of it) has room,
whatever the batch backlog has booked, charged to the reserve only. Batch calls are
scheduled at the rate minus ``INTERACTIVE_YIELD`` times the interactive rate
of the last ``OBSERVE_SECONDS`` (at most the reserve), so the interactive calls fit
inside the limit; an idle reserve is batch's to use. Over its reserve an interactive
call books like any call, and waits in a line of its own that goes before the batch
line.

**Adaptive rates** (additive increase, multiplicative decrease, the rule TCP's
congestion control made standard: Jacobson 1988; CUBIC's "approach the last ceiling
fast, probe slowly beyond it", RFC 8312): a provider 429 cuts the scope's rate to
``CUT`` of what it was (of the rate actually observed, for a scope whose limit is not
configured and so is learned this way; never above the rate the provider accepted over
the last ``OBSERVE_SECONDS``, since asking faster proves nothing), at most once per
``CUT_GUARD_SECONDS``; every
booking made at the old rate is dropped (its job books again when it comes back) and
the schedule waits out the provider's ``Retry-After``. The rate then
grows back towards the rate at the cut with a 5 s time constant up to ``APPROACH`` of
it, and from there by ``PROBE`` of it per second, faster the longer no 429 comes (twice as fast
after ``PROBE_ACCEL_SECONDS``), up to the configured limit (none for a learned one).
A limit learned for the first time starts in *slow start* (TCP's name): it grows by
``SLOW_START`` per second, exponentially, until the next 429, since the first estimate
(the first instants' answers) may be far below the limit.

**Concurrency**: a sorted set of the calls in flight (job id, scored by a deadline so a
dead worker's entry lapses); at the limit a call waits briefly and asks again.

Tokens are estimated before the call (an EWMA of the scope's recent calls) and
reconciled with the reported usage after it (:meth:`Pacer.settle`), so the token TAT
ends up charged with what was really spent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis

from dspy_fleet.fleet_config import FleetConfig
from dspy_fleet.store.jobs import PENDING_KEY

PREFIX = "dspy_fleet:pace:"
CUT = 0.9  # a 429 cuts the rate to this share of what the provider accepted
SLOW_START = 0.1  # a just-learned rate grows by this share per second until its next 429
CUT_FLOOR = 0.5  # one cut never takes more than half of the rate
MIN_FACTOR = 0.1  # a configured limit is never paced below this share of it
APPROACH = 0.97  # growth is fast up to this share of the rate at the last cut ...
PROBE = 0.01  # ... and beyond it, this share of that rate per second
GROWTH_SECONDS = 5.0  # the time constant of the fast part
PROBE_ACCEL_SECONDS = 10.0  # probing beyond the ceiling doubles its speed after this long
CUT_GUARD_SECONDS = 1.0  # 429s of calls already in flight at a cut do not cut again
CONCURRENCY_WAIT = 0.25  # seconds a call at the concurrency limit waits before asking again
DEFAULT_TOKENS = 500  # a call's token estimate before any call of the scope was settled
STALE_BOOKING_SECONDS = 3600  # a booking whose job never came back is dropped after this
OBSERVE_SECONDS = 2.0  # the window over which the provider's accepted rate is measured
INTERACTIVE_BURST_SECONDS = 2.0  # the interactive reserve's bucket holds this much of its rate
INTERACTIVE_YIELD = 1.25  # batch leaves room for 1.25 x the recent interactive rate
LATE_SECONDS = 0.25  # a booking is honoured up to this long after its slot, no later
PULL_AGAIN_SECONDS = 3.0  # a job pulled forward this recently is on its way: not pulled again
# An effective rate that climbed (or fell) by this share since the change last reported is
# reported again (a log line fleet-wide, by whichever worker saw it): every step of a
# climb back, not every instant of it.
NEWS_STEP = 0.1

# Shared Lua: state of one scope, brought up to date (adaptive growth) on every read.
# State hash fields: factor (share of the configured limits, 1 = all), fceil (factor at the
# last cut), learned (requests/min learned for a scope without a configured rpm; 0 = not
# learned, unlimited), lceil, grown (last growth time), cut (last cut time), obs_t0 and
# obs_n (calls the provider accepted since obs_t0), obs_rate (accepted requests/min over
# the last window),
# tok_avg (tokens per call, EWMA), tat_<kind> (the shared GCRA TAT, kind r or t) and
# itat_<kind> (the interactive reserve's).
_COMMON = """
local function clock()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1e6
end

local function num(h, f, d)
  local v = redis.call('HGET', h, f)
  if v then return tonumber(v) end
  return d
end

local function grown(x, ceil, cap, dt, since, start)
  if ceil <= 0 or x <= 0 then return x end
  if start then
    -- Slow start: the first estimate (from the first instants' answers) may be far
    -- below the limit; grow exponentially until the provider says stop.
    x = x * math.exp(SLOW_START * dt)
  elseif x < APPROACH * ceil then
    -- Towards the ceiling with time constant GROWTH (so it gets past APPROACH of it).
    x = ceil - (ceil - x) * math.exp(-dt / GROWTH)
  else
    -- Probing beyond the last ceiling speeds up the longer no 429 came (the ceiling may
    -- have been measured low): PROBE per second at first, twice that after PROBE_ACCEL s.
    x = x + PROBE * math.max(ceil, x) * dt * (1 + since / PROBE_ACCEL)
  end
  if cap > 0 and x > cap then x = cap end
  return x
end

-- The scope's effective limits now: rpm (0 = none), tpm (0 = none), after growth.
-- Bring the heads of a scope's lines forward while the next `horizon` seconds have free
-- slots: their due time in the job store's index becomes now, so the due sweep publishes
-- them at once (a job pulled in the last PULL_AGAIN s is on its way and counts).
local function pull(s, rpm, tpm, now, horizon)
  local k = 6 * (s - 1)
  local h, pulled, pending = KEYS[k + 1], KEYS[k + 6], KEYS[#KEYS]
  local rate, tat
  if rpm > 0 then
    rate, tat = rpm / 60, num(h, 'tat_r', now)
  elseif tpm > 0 then
    rate, tat = tpm / 60 / num(h, 'tok_avg', DEFAULT_TOKENS), num(h, 'tat_t', now)
  else
    return
  end
  local free = math.floor((now + horizon - math.max(tat, now)) * rate)
  if free <= 0 then return end
  redis.call('ZREMRANGEBYSCORE', pulled, '-inf', now - PULL_AGAIN)
  local taken = 0
  for _, line in ipairs({KEYS[k + 4], KEYS[k + 5]}) do
    for _, id in ipairs(redis.call('ZRANGE', line, 0, free + PULL_SCAN)) do
      if taken >= free then return end
      if not redis.call('ZSCORE', pulled, id) then
        redis.call('ZADD', pending, 'XX', 'LT', now, id)
        redis.call('ZADD', pulled, now, id)
      end
      taken = taken + 1
    end
  end
end

-- Interactive calls admitted per second lately (the last whole window, or the current
-- one counted over at least 1 s); 0 once a whole window passed without any.
local function interactive_rate(h, now)
  local elapsed = now - num(h, 'i_t0', -1e9)
  if elapsed >= 2 * OBS_WINDOW then return 0 end
  local current = num(h, 'i_n', 0) / math.max(elapsed, 1)
  if elapsed < OBS_WINDOW then return math.max(current, num(h, 'i_rate', 0)) end
  return current
end

-- Whether the scope's effective requests/min `rpm` is news since the change last reported
-- (fleet-wide, in the state hash): a move of NEWS_STEP of it or more, reaching the
-- configured `cap`, or to or from unlimited (0). Returns the rate last reported, or nil.
-- The first rate seen is recorded quietly: it is where the scope starts, not a change.
local function news(h, rpm, cap)
  local last = tonumber(redis.call('HGET', h, 'logged_rpm') or '-1')
  if last < 0 then
    redis.call('HSET', h, 'logged_rpm', rpm)
    return nil
  end
  if rpm == last then return nil end
  local big = math.abs(rpm - last) >= NEWS_STEP * math.max(rpm, last)
  local top = cap > 0 and rpm >= cap and last < cap
  if big or top or rpm == 0 or last == 0 then
    redis.call('HSET', h, 'logged_rpm', rpm)
    return last
  end
  return nil
end

local function limits(h, rpm_cfg, tpm_cfg, now)
  local factor = num(h, 'factor', 1)
  local learned = num(h, 'learned', 0)
  local dt = now - num(h, 'grown', now)
  if dt > 0 then
    local since = now - num(h, 'cut', now)
    factor = grown(factor, num(h, 'fceil', 1), 1, dt, since, false)
    learned = grown(learned, num(h, 'lceil', 0), 0, dt, since, redis.call('HGET', h, 'ss') == '1')
    redis.call('HSET', h, 'factor', factor, 'learned', learned, 'grown', now)
  elseif not redis.call('HGET', h, 'grown') then
    redis.call('HSET', h, 'grown', now)
  end
  local rpm = 0
  if rpm_cfg > 0 then rpm = rpm_cfg * factor elseif learned > 0 then rpm = learned end
  local tpm = 0
  if tpm_cfg > 0 then tpm = tpm_cfg * factor end
  return rpm, tpm
end
"""

# Admit one call, book it, or put it in line. KEYS: per scope: state hash, bookings,
# running, interactive line, batch line. ARGV: lane ('i' or 'b'), job id, estimated
# requests, estimated tokens (0: the scope's average), hold seconds, burst seconds,
# interactive share, horizon seconds, then per scope: rpm, tpm, max concurrency (0 = none).
# Returns {1, '0', '', charges} admitted (charges: "scope:kind:units" joined by ','), or
# {0, seconds (string), why, ''} to come back after: why = 'booked' (a slot within the
# horizon is held), 'queued' (in line; its turn is about then), or 'concurrency'.
_ACQUIRE = """
local lane, job = ARGV[1], ARGV[2]
local est_r, est_t = tonumber(ARGV[3]), tonumber(ARGV[4])
local hold, burst, share = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local horizon = tonumber(ARGV[8])
local ns = (#KEYS - 1) / 6
local now = clock()

for s = 1, ns do
  local k = 6 * (s - 1)
  -- Bookings and places in line of jobs that never came back lapse after a while.
  redis.call('ZREMRANGEBYSCORE', KEYS[k + 2], '-inf', now - STALE)
  redis.call('ZREMRANGEBYSCORE', KEYS[k + 4], '-inf', now - STALE)
  redis.call('ZREMRANGEBYSCORE', KEYS[k + 5], '-inf', now - STALE)
  -- Concurrency first: at the limit nothing is booked or charged.
  local maxc = tonumber(ARGV[8 + 3 * s])
  redis.call('ZREMRANGEBYSCORE', KEYS[k + 3], '-inf', now)
  if maxc > 0 and not redis.call('ZSCORE', KEYS[k + 3], job)
     and redis.call('ZCARD', KEYS[k + 3]) >= maxc then
    return {0, tostring(CONC_WAIT), 'concurrency', ''}
  end
end

local wait, booked_wait = 0, 0
local fast = lane == 'i'
local plan = {}
local rates = {}
local function pull_all()
  for s = 1, ns do pull(s, rates[s][1], rates[s][2], now, horizon) end
end
for s = 1, ns do
  local k = 6 * (s - 1)
  local h = KEYS[k + 1]
  local rpm, tpm = limits(h, tonumber(ARGV[6 + 3 * s]), tonumber(ARGV[7 + 3 * s]), now)
  rates[s] = {rpm, tpm}
  -- The provider's Retry-After holds every call of the scope, reserve and bookings too.
  local hold = num(h, 'hold', 0)
  if hold > now then return {0, tostring(hold - now), 'retry_after', ''} end
  local slot = redis.call('ZSCORE', KEYS[k + 2], job)
  if slot and tonumber(slot) < now - LATE then
    -- Came too late for its slot (its message waited behind others): the slot is
    -- gone; sending now on top of the slots booked since would break the rate.
    redis.call('ZREM', KEYS[k + 2], job)
    slot = nil
  end
  if slot then
    booked_wait = math.max(booked_wait, tonumber(slot) - now)
  else
    local avg = num(h, 'tok_avg', DEFAULT_TOKENS)
    for _, kind in ipairs({'r', 't'}) do
      local per_min, cost = rpm, est_r
      if kind == 't' then
        per_min, cost = tpm, est_t
        if cost <= 0 then cost = avg end
      end
      if per_min > 0 then
        local r = per_min / 60
        local ri = r * share
        if lane == 'b' then
          -- Batch leaves room for the interactive calls that are coming (their recent
          -- rate and a margin, at most the reserve), so they fit inside the limit; an
          -- idle reserve is batch's to use.
          local using = interactive_rate(h, now) * YIELD
          if kind == 't' then using = using * avg end
          r = r - math.min(ri, using)
        end
        local cap = math.max(cost, r * burst)
        local tat = math.max(num(h, 'tat_' .. kind, now), now)
        local w = math.max(0, tat + cost / r - cap / r - now)
        if ri > 0 and lane == 'i' then
          -- The interactive reserve: its own bucket, on top of the shared schedule.
          local icap = math.max(cost, ri * IBURST)
          local itat = math.max(num(h, 'itat_' .. kind, now), now)
          if itat + cost / ri - icap / ri - now > 0 then fast = false end
        else
          fast = false
        end
        plan[#plan + 1] = {s, kind, cost, r, ri}
        wait = math.max(wait, w)
      end
    end
  end
end

local function leave_lines()
  for s = 1, ns do
    local k = 6 * (s - 1)
    redis.call('ZREM', KEYS[k + 2], job)
    redis.call('ZREM', KEYS[k + 4], job)
    redis.call('ZREM', KEYS[k + 5], job)
    redis.call('ZREM', KEYS[k + 6], job)
  end
end

if booked_wait > 0 then return {0, tostring(booked_wait), 'booked', ''} end

if (fast and #plan > 0) or wait == 0 then
  local charges = {}
  for _, p in ipairs(plan) do
    local h = KEYS[6 * (p[1] - 1) + 1]
    if fast then
      -- From the reserve only: batch already leaves room for the interactive rate.
      local fi = 'itat_' .. p[2]
      redis.call('HSET', h, fi, math.max(num(h, fi, now), now) + p[3] / p[5])
      charges[#charges + 1] = p[1] .. ':' .. p[2] .. ':' .. p[3] .. ':f'
    else
      local f = 'tat_' .. p[2]
      redis.call('HSET', h, f, math.max(num(h, f, now), now) + p[3] / p[4])
      charges[#charges + 1] = p[1] .. ':' .. p[2] .. ':' .. p[3]
    end
  end
  leave_lines()
  for s = 1, ns do
    local k = 6 * (s - 1)
    redis.call('ZADD', KEYS[k + 3], now + hold, job)
    if lane == 'i' then
      local h = KEYS[k + 1]
      local t0 = num(h, 'i_t0', -1e9)
      if now - t0 >= OBS_WINDOW then
        local rate = 0
        if now - t0 < 2 * OBS_WINDOW then rate = num(h, 'i_n', 0) / (now - t0) end
        redis.call('HSET', h, 'i_rate', rate, 'i_t0', now, 'i_n', 1)
      else
        redis.call('HSET', h, 'i_n', num(h, 'i_n', 0) + 1)
      end
    end
    -- The rate calls are sent at, for a 429 that comes before any call was accepted.
    local h = KEYS[k + 1]
    local t0 = num(h, 'ask_t0', now)
    if now - t0 >= OBS_WINDOW then
      redis.call('HSET', h, 'ask_t0', now, 'ask_n', 1)
    else
      redis.call('HSET', h, 'ask_t0', t0, 'ask_n', num(h, 'ask_n', 0) + 1)
    end
  end
  pull_all()
  return {1, '0', '', table.concat(charges, ',')}
end

if wait <= horizon then
  -- Book the earliest slot every limit allows; honoured when the job comes back.
  local slot = now + wait
  for _, p in ipairs(plan) do
    local h = KEYS[6 * (p[1] - 1) + 1]
    local f = 'tat_' .. p[2]
    redis.call('HSET', h, f, math.max(num(h, f, now), slot) + p[3] / p[4])
  end
  leave_lines()
  for s = 1, ns do redis.call('ZADD', KEYS[6 * (s - 1) + 2], slot, job) end
  pull_all()
  return {0, tostring(wait), 'booked', ''}
end

-- Beyond the horizon: wait in line (first come, first served; interactive first), and
-- come back a little before the turn its place in line gives it.
local eta = wait
for s = 1, ns do
  local k = 6 * (s - 1)
  local line = KEYS[k + 5]
  if lane == 'i' then line = KEYS[k + 4] end
  redis.call('ZADD', line, 'NX', now, job)
  local ahead = redis.call('ZRANK', line, job)
  if lane == 'b' then ahead = ahead + redis.call('ZCARD', KEYS[k + 4]) end
  local step = 0
  for _, p in ipairs(plan) do
    if p[1] == s then step = math.max(step, p[3] / p[4]) end
  end
  eta = math.max(eta, wait + ahead * step)
end
pull_all()
-- Pulled forward when slots free up (see pull); back by itself at its turn otherwise.
return {0, tostring(math.max(horizon / 2, eta)), 'queued', ''}
"""

# Settle an admitted call: give its concurrency place back and charge the difference
# between the estimate and what it really cost (requests made; tokens reported).
# Calls the provider accepted (anything but a 429) are counted: the rate it accepted is
# what a 429 cuts from (see _CUT). KEYS: as _ACQUIRE. ARGV: job id, actual requests,
# actual tokens (-1: unknown), charges, accepted (1/0), horizon s, then per scope rpm, tpm.
# Returns {scope number, rate last reported, rate now} for each scope whose effective
# requests/min changed enough to report (see news), rates as strings.
_SETTLE = """
local job = ARGV[1]
local actual = {r = tonumber(ARGV[2]), t = tonumber(ARGV[3])}
local horizon = tonumber(ARGV[6])
local now = clock()
for s = 1, (#KEYS - 1) / 6 do
  local h = KEYS[6 * (s - 1) + 1]
  redis.call('ZREM', KEYS[6 * (s - 1) + 3], job)
  if ARGV[5] == '1' then
    local t0 = num(h, 'obs_t0', now)
    local n = num(h, 'obs_n', 0) + actual.r
    if now - t0 >= OBS_WINDOW then
      redis.call('HSET', h, 'obs_rate', n / (now - t0) * 60, 'obs_t0', now, 'obs_n', 0)
    else
      redis.call('HSET', h, 'obs_t0', t0, 'obs_n', n)
    end
  end
end
for charge in string.gmatch(ARGV[4], '[^,]+') do
  local s, kind, est = string.match(charge, '(%d+):(%a):([%d%.e%-]+)')
  local reserve = string.sub(charge, -2) == ':f'
  s = tonumber(s)
  local h = KEYS[6 * (s - 1) + 1]
  local rpm, tpm = limits(h, tonumber(ARGV[5 + 2 * s]), tonumber(ARGV[6 + 2 * s]), now)
  local per_min = rpm
  if kind == 't' then per_min = tpm end
  local got = actual[kind]
  if per_min > 0 and got >= 0 and not reserve then
    local f = 'tat_' .. kind
    redis.call('HSET', h, f, num(h, f, now) + (got - tonumber(est)) / (per_min / 60))
  end
  if kind == 't' and got > 0 then
    local avg = num(h, 'tok_avg', got)
    redis.call('HSET', h, 'tok_avg', avg + 0.2 * (got - avg))
  end
end
local changed = {}
for s = 1, (#KEYS - 1) / 6 do
  local rpm_cfg = tonumber(ARGV[5 + 2 * s])
  local rpm, tpm = limits(KEYS[6 * (s - 1) + 1], rpm_cfg, tonumber(ARGV[6 + 2 * s]), now)
  pull(s, rpm, tpm, now, horizon)
  local last = news(KEYS[6 * (s - 1) + 1], rpm, rpm_cfg)
  if last then changed[#changed + 1] = {s, tostring(last), tostring(rpm)} end
end
return changed
"""

# A provider 429: cut the rate (once per guard period), drop the bookings made at the
# old rate (their jobs book again when they come back; the lines keep their order), and
# wait out Retry-After. KEYS: as _ACQUIRE. ARGV: retry-after seconds (0: none given),
# burst seconds, then per scope rpm, tpm. Returns per scope {new rpm (string; 0:
# unlimited), 1 if cut, rpm before (string)}; a cut is the reported rate from now (news).
_CUT = """
local retry_after, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local now = clock()
local out = {}
for s = 1, (#KEYS - 1) / 6 do
  local h, booked = KEYS[6 * (s - 1) + 1], KEYS[6 * (s - 1) + 2]
  local rpm_cfg, tpm_cfg = tonumber(ARGV[1 + 2 * s]), tonumber(ARGV[2 + 2 * s])
  local before = limits(h, rpm_cfg, tpm_cfg, now)
  local did = 0
  local from = now + retry_after
  if now - num(h, 'cut', 0) >= CUT_GUARD then
    did = 1
    -- The rate the provider accepted lately (requests/min; 0: not measured yet): a 429
    -- says that is about its limit, however fast we were asking.
    -- (the last whole window's, or the current one's counted over at least 1 s, so a
    -- few answers in a first instant do not pass for a high rate)
    local t0, n = num(h, 'obs_t0', now), num(h, 'obs_n', 0)
    local accepted = math.max(num(h, 'obs_rate', 0), n / math.max(now - t0, 1) * 60)
    local factor = num(h, 'factor', 1)
    if rpm_cfg > 0 and accepted > 0 then
      -- Never more than halved by one cut: a rate measured while the fleet was waiting
      -- out a Retry-After is low for that reason, not the provider's.
      factor = math.min(factor, math.max(accepted / rpm_cfg, factor * FLOOR))
    end
    -- A configured limit is never paced below MIN_FACTOR of it: the operator said the
    -- account allows it, and 429s that do not come from the rate must not starve it.
    redis.call('HSET', h, 'factor', math.max(factor * CUT, MIN_FACTOR), 'fceil', factor, 'cut', now)
    if rpm_cfg <= 0 then
      -- Not configured: learn it, from the accepted rate, or cut what was learned.
      local base = num(h, 'learned', 0)
      if base <= 0 then
        -- The first 429: the first instant's few accepted answers say little; start from
        -- the rate the calls were sent at, in slow start, and let the next 429 (with a
        -- second of accepted answers behind it) bring it down.
        local a0 = num(h, 'ask_t0', now)
        base = math.max(accepted, num(h, 'ask_n', 0) / math.max(now - a0, 1) * 60)
        redis.call('HSET', h, 'ss', '1')
      else
        redis.call('HSET', h, 'ss', '0')
        if accepted > 0 then base = math.min(base, math.max(accepted, base * FLOOR)) end
      end
      base = math.max(base, 1)
      redis.call('HSET', h, 'learned', math.max(1, base * CUT), 'lceil', base)
    end
    redis.call('DEL', booked)
    -- The provider's bucket is empty: start from an empty one too, the first call at
    -- Retry-After (now without one), then one interval apart, no burst.
    local rpm, tpm = limits(h, rpm_cfg, tpm_cfg, now)
    local empty = {tat_r = 0, tat_t = 0}
    if rpm > 0 then empty.tat_r = math.max(0, burst - 60 / rpm) end
    if tpm > 0 then
      empty.tat_t = math.max(0, burst - num(h, 'tok_avg', DEFAULT_TOKENS) / (tpm / 60))
    end
    redis.call('HSET', h, 'tat_r', from + empty.tat_r, 'tat_t', from + empty.tat_t,
               'itat_r', from, 'itat_t', from, 'hold', from)
  elseif retry_after > 0 then
    for _, f in ipairs({'tat_r', 'tat_t', 'itat_r', 'itat_t', 'hold'}) do
      if num(h, f, 0) < from then redis.call('HSET', h, f, from) end
    end
  end
  local new_rpm = limits(h, rpm_cfg, tpm_cfg, now)
  if did == 1 then redis.call('HSET', h, 'logged_rpm', new_rpm) end
  out[#out + 1] = {tostring(new_rpm), did, tostring(before)}
end
return out
"""


# Each scope's effective limits now (after growth). KEYS: per scope: state hash.
# ARGV: per scope rpm, tpm. Returns per scope {rpm, tpm} as strings (0: unlimited).
_RATES = """
local now = clock()
local out = {}
for s = 1, #KEYS do
  local rpm, tpm = limits(KEYS[s], tonumber(ARGV[2 * s - 1]), tonumber(ARGV[2 * s]), now)
  out[#out + 1] = {tostring(rpm), tostring(tpm)}
end
return out
"""


def _lua(source: str) -> str:
    constants = (
        f"local APPROACH, PROBE, GROWTH = {APPROACH}, {PROBE}, {GROWTH_SECONDS}\n"
        f"local CUT, CUT_GUARD, SLOW_START = {CUT}, {CUT_GUARD_SECONDS}, {SLOW_START}\n"
        f"local FLOOR, MIN_FACTOR = {CUT_FLOOR}, {MIN_FACTOR}\n"
        f"local CONC_WAIT, DEFAULT_TOKENS = {CONCURRENCY_WAIT}, {DEFAULT_TOKENS}\n"
        f"local STALE, IBURST = {STALE_BOOKING_SECONDS}, {INTERACTIVE_BURST_SECONDS}\n"
        f"local YIELD, LATE = {INTERACTIVE_YIELD}, {LATE_SECONDS}\n"
        f"local OBS_WINDOW, PROBE_ACCEL = {OBSERVE_SECONDS}, {PROBE_ACCEL_SECONDS}\n"
        f"local PULL_AGAIN, PULL_SCAN = {PULL_AGAIN_SECONDS}, 10\n"
        f"local NEWS_STEP = {NEWS_STEP}\n"
    )
    return constants + _COMMON + source


@dataclass(frozen=True)
class Limits:
    """One scope's configured limits (0: none): requests/min, tokens/min, calls in flight."""

    rpm: int = 0
    tpm: int = 0
    max_concurrency: int = 0

    @property
    def any(self) -> bool:
        """Whether anything is configured (a scope without limits still learns from 429s)."""
        return bool(self.rpm or self.tpm or self.max_concurrency)


@dataclass(frozen=True)
class Scope:
    """A name the limits apply to: ``model:<alias>`` or ``account:<name>``."""

    name: str
    limits: Limits

    @property
    def keys(self) -> tuple[str, ...]:
        """Its state hash, bookings, calls in flight, interactive and batch lines, and the
        jobs pulled forward from the lines."""
        b = PREFIX + self.name
        return b, b + ":booked", b + ":running", b + ":line:i", b + ":line:b", b + ":pulled"


@dataclass(frozen=True)
class Admission:
    """The answer to :meth:`Pacer.acquire`."""

    admitted: bool
    wait: float  # seconds to come back after (0 when admitted)
    why: str  # 'booked' (a slot is held), 'queued' (in line), 'concurrency' or 'retry_after'
    charges: str = ""  # what was charged, for settle()


@dataclass(frozen=True)
class Cut:
    """A 429's effect on one scope."""

    scope: str
    rpm: float  # the new effective requests/min (0: unlimited)
    cut: bool  # False when another 429 cut it within the guard period
    before: float = 0.0  # the effective requests/min just before (0: unlimited)


@dataclass(frozen=True)
class RateChange:
    """A scope's effective requests/min moved enough to report (a climb after a cut, or
    reaching its configured limit): fleet-wide, one report per change."""

    scope: str
    before: float  # the rate last reported (0: unlimited)
    after: float  # now (0: unlimited)


@dataclass
class Pacer:
    """The fleet's pacing, one per worker process; every call is one Lua script."""

    client: redis.Redis
    scopes: dict[str, list[Scope]]  # model alias -> its scopes (model first, then account)
    interactive_share: float = 0.2
    burst_seconds: float = 0.25
    lease_seconds: float = 60.0
    horizon_seconds: float = 2.0

    def __post_init__(self) -> None:
        self._acquire = self.client.register_script(_lua(_ACQUIRE))
        self._settle = self.client.register_script(_lua(_SETTLE))
        self._cut = self.client.register_script(_lua(_CUT))
        self._rates = self.client.register_script(_lua(_RATES))

    def _of(self, model: str) -> list[Scope]:
        return self.scopes.get(model) or [Scope(f"model:{model}", Limits())]

    def acquire(self, model: str, job_id: str, *, interactive: bool, requests: int = 1,
                tokens: int = 0, hold_seconds: float | None = None) -> Admission:  # fmt: skip
        """Admit a job's call on ``model`` now, or book its slot and say when to come back.

        ``tokens`` is the job's token estimate (0: the scope's running average);
        ``hold_seconds`` how long its concurrency place lasts unless settled sooner (the
        call's timeout and a margin; default ``lease_seconds``).
        Raises redis.RedisError when Redis fails (the caller decides: the job is handed
        back, never run unpaced in silence)."""
        scopes = self._of(model)
        keys = [*(k for s in scopes for k in s.keys), PENDING_KEY]
        args: list[Any] = [
            "i" if interactive else "b", job_id, requests, tokens,
            hold_seconds or self.lease_seconds, self.burst_seconds, self.interactive_share,
            self.horizon_seconds,
        ]  # fmt: skip
        for s in scopes:
            args += [s.limits.rpm, s.limits.tpm, s.limits.max_concurrency]
        admitted, wait, why, charges = self._acquire(keys=keys, args=args)
        return Admission(bool(int(admitted)), float(wait), _text(why), _text(charges))

    def settle(self, model: str, job_id: str, admission: Admission, *, requests: int,
               tokens: int | None, accepted: bool = True) -> list[RateChange]:  # fmt: skip
        """After the call: free its concurrency place, charge the real requests and tokens
        (``tokens`` None: not reported, the estimate stands); ``accepted``: the provider
        did not answer 429 (such calls measure the rate it accepts). Returns the scopes
        whose effective rate changed enough to report (the caller logs them)."""
        scopes = self._of(model)
        keys = [*(k for s in scopes for k in s.keys), PENDING_KEY]
        args: list[Any] = [job_id, requests, -1 if tokens is None else tokens,
                           admission.charges, "1" if accepted else "0",
                           self.horizon_seconds]  # fmt: skip
        for s in scopes:
            args += [s.limits.rpm, s.limits.tpm]
        reply = self._settle(keys=keys, args=args)
        return [RateChange(scopes[int(n) - 1].name, float(before), float(after))
                for n, before, after in reply]  # fmt: skip

    def cut(self, model: str, retry_after: float | None) -> list[Cut]:
        """A provider 429 on ``model``: slow every scope of it down (see the module doc).
        The caller reports the cuts (``cut`` True) as effective-rate changes."""
        scopes = self._of(model)
        keys = [*(k for s in scopes for k in s.keys), PENDING_KEY]
        args: list[Any] = [retry_after or 0, self.burst_seconds]
        for s in scopes:
            args += [s.limits.rpm, s.limits.tpm]
        reply = self._cut(keys=keys, args=args)
        return [
            Cut(s.name, float(r[0]), bool(int(r[1])), float(r[2]))
            for s, r in zip(scopes, reply, strict=True)
        ]

    def effective_rpm(self, model: str) -> float | None:
        """The requests/min ``model`` is paced at now: the lowest effective rate of its
        scopes (its own, its account's); None when none has a limit (unlimited)."""
        limited = [rpm for rpm, _tpm in self.rates(model).values() if rpm > 0]
        return min(limited) if limited else None

    def rates(self, model: str) -> dict[str, tuple[float, float]]:
        """Each scope of ``model``: its effective (requests/min, tokens/min) now, after
        any cut and the growth since; 0 means unlimited (nothing configured or learned)."""
        scopes = self._of(model)
        args: list[Any] = [v for s in scopes for v in (s.limits.rpm, s.limits.tpm)]
        reply = self._rates(keys=[s.keys[0] for s in scopes], args=args)
        return {s.name: (float(r[0]), float(r[1])) for s, r in zip(scopes, reply, strict=True)}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def scopes_for(config: FleetConfig) -> dict[str, list[Scope]]:
    """Each model alias's pacing scopes: its own limits, then its account's (if any)."""
    scopes: dict[str, list[Scope]] = {}
    for alias, model in config.models.items():
        own = Limits(model.rpm or 0, model.tpm or 0, model.max_concurrency or 0)
        scopes[alias] = [Scope(f"model:{alias}", own)]
        if model.account is not None:
            acct = config.accounts[model.account]
            limits = Limits(acct.rpm or 0, acct.tpm or 0, acct.max_concurrency or 0)
            scopes[alias].append(Scope(f"account:{model.account}", limits))
    return scopes


def configured_rpm(config: FleetConfig, model: str) -> int | None:
    """The lowest requests/min configured for ``model`` (its own or its account's)."""
    cfg = config.models[model]
    acct = config.accounts.get(cfg.account) if cfg.account is not None else None
    limits = [r for r in (cfg.rpm, acct.rpm if acct else None) if r]
    return min(limits) if limits else None
