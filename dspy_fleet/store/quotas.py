"""Tenant quotas and budgets: requests and tokens per UTC day, USD per UTC month.

Counters live in one Redis hash per tenant, one field per period, and every period is
read from Redis's clock inside the script that uses it (so the whole fleet agrees on
when a day or month ends, whatever the hosts' clocks say):

- ``req:<YYYY-MM-DD>``: requests accepted (the API counts them at submission, before
  anything is queued, for tenants that have any quota configured);
- ``tok:<YYYY-MM-DD>``: input + output tokens billed;
- ``usd:<YYYY-MM>``: nano-USD billed;
- ``max:<model>``: the most a single job of that model has cost the tenant (nano-USD).

Tokens and spend are added by the job store's finish script (dspy_fleet/store/jobs.py),
in the same atomic step that writes the job's cost record into the ledger's aggregates
(dspy_fleet/store/ledger.py), from the same increments: ``/v1/usage`` and ``/costs``
sum the same records and cannot disagree.

**The budget bound.** Before each provider call the worker *reserves* the job's
expected cost (``max:<model>``) in the tenant's in-flight hash; the finish script turns
the reservation into spend. A call is admitted when nothing of the tenant is in flight
and spend is under the budget, or when spend + every reservation in flight + its own
estimate stays within the budget; otherwise it waits (throttled) for the calls in flight
to settle, and fails with ``budget_exhausted`` once spend has reached the budget. So:

    final spend < budget + the cost of one job,

provided no job costs more than the most expensive job of its model that the tenant
had finished before it was admitted (a job dearer than its reservation can overshoot by
its excess). Until a model's first job of the tenant has finished, its calls go one at
a time. Tokens per day are checked, not reserved: a day's tokens may end over the quota
by at most the tokens of the tenant's calls in flight when it was reached.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

import redis

from dspy_fleet.errors import BudgetExhaustedError, QuotaExceededError, Throttled
from dspy_fleet.fleet_config import TenantQuota
from dspy_fleet.store.ledger import NANO

PREFIX = "dspy_fleet:quota:"
# A tenant's counters outlive its last write by this long: the month's spend must
# survive the whole month, and last month's is still worth reading.
KEEP_SECONDS = 62 * 86400
# A job that may not call yet (its tenant's calls in flight may use the budget up)
# asks again after this long.
BUDGET_WAIT_SECONDS = 0.5
QUOTAS = ("requests_per_day", "tokens_per_day", "usd_per_month")

# Shared Lua: Redis's clock, and the UTC day and month of an instant (Howard Hinnant's
# civil_from_days; Redis's Lua has no os.date).
CALENDAR = """
local function clock()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1e6
end

local function civil(days)
  local z = days + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524)
                          - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local d = doy - math.floor((153 * mp + 2) / 5) + 1
  local m = mp + 3
  if mp >= 10 then m = mp - 9 end
  local y = yoe + era * 400
  if m <= 2 then y = y + 1 end
  return y, m, d
end

local function periods(now)
  local y, m, d = civil(math.floor(now / 86400))
  return string.format('%04d-%02d-%02d', y, m, d), string.format('%04d-%02d', y, m)
end

local function qnum(h, f)
  local v = redis.call('HGET', h, f)
  if v then return tonumber(v) end
  return 0
end
"""

# Spend a finished job's tokens and cost, and turn its reservation (if any) into spend.
# Called inside the job store's finish script. K: quota hash, in-flight hash, in-flight
# deadlines. A: job id, model, tokens, nano-USD, keep seconds.
SPEND_FUNCTION = """
local function quota_spend(K, A)
  local day, month = periods(clock())
  if tonumber(A[3]) > 0 then redis.call('HINCRBY', K[1], 'tok:' .. day, A[3]) end
  local cost = tonumber(A[4])
  if cost > 0 then
    redis.call('HINCRBY', K[1], 'usd:' .. month, A[4])
    if cost > qnum(K[1], 'max:' .. A[2]) then redis.call('HSET', K[1], 'max:' .. A[2], A[4]) end
  end
  redis.call('EXPIRE', K[1], A[5])
  redis.call('HDEL', K[2], A[1])
  redis.call('ZREM', K[3], A[1])
end
"""

# At submission: refuse when a quota is used up, else count the requests. KEYS: quota
# hash. ARGV: requests, requests/day limit, tokens/day limit, nano-USD/month limit (-1:
# none), keep seconds. Returns {1, day, '', '', now} or {0, quota, used, limit, now}.
_ADMIT = """
local now = clock()
local day, month = periods(now)
local n = tonumber(ARGV[1])
local rl, tl, ul = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local h = KEYS[1]
local spent = qnum(h, 'usd:' .. month)
if ul >= 0 and spent >= ul then
  return {0, 'usd_per_month', tostring(spent), ARGV[4], tostring(now)}
end
local tok = qnum(h, 'tok:' .. day)
if tl >= 0 and tok >= tl then
  return {0, 'tokens_per_day', tostring(tok), ARGV[3], tostring(now)}
end
local req = qnum(h, 'req:' .. day)
if rl >= 0 and req + n > rl then
  return {0, 'requests_per_day', tostring(req), ARGV[2], tostring(now)}
end
redis.call('HINCRBY', h, 'req:' .. day, n)
redis.call('EXPIRE', h, ARGV[5])
return {1, day, '', '', tostring(now)}
"""

# Give back requests counted by _ADMIT that were not accepted after all (an idempotent
# replay, a refused record). KEYS: quota hash. ARGV: day, requests.
_REFUND = """
local f = 'req:' .. ARGV[1]
local left = math.max(0, qnum(KEYS[1], f) - tonumber(ARGV[2]))
if redis.call('HEXISTS', KEYS[1], f) == 1 then redis.call('HSET', KEYS[1], f, left) end
return 1
"""

# Before a provider call: may the job call? KEYS: quota hash, in-flight hash (job ->
# reserved nano-USD), in-flight deadlines (job -> Redis time). ARGV: job id, model,
# tokens/day limit, nano-USD/month limit (-1: none), hold seconds.
# Returns {1 (go) | 0 (used up) | 2 (wait), quota, used, limit, now}.
_RESERVE = """
local now = clock()
local day, month = periods(now)
local h, held, till = KEYS[1], KEYS[2], KEYS[3]
local job, model = ARGV[1], ARGV[2]
local tl, ul = tonumber(ARGV[3]), tonumber(ARGV[4])
local tok = qnum(h, 'tok:' .. day)
if tl >= 0 and tok >= tl then
  return {0, 'tokens_per_day', tostring(tok), ARGV[3], tostring(now)}
end
if ul < 0 then return {1, '', '', '', tostring(now)} end
local spent = qnum(h, 'usd:' .. month)
if spent >= ul then return {0, 'usd_per_month', tostring(spent), ARGV[4], tostring(now)} end
-- Its own earlier reservation (before a fallback, a throttled turn) is replaced; those of
-- calls whose worker died lapse at their deadline.
redis.call('HDEL', held, job)
redis.call('ZREM', till, job)
local gone = redis.call('ZRANGEBYSCORE', till, '-inf', now)
if #gone > 0 then
  redis.call('HDEL', held, unpack(gone))
  redis.call('ZREM', till, unpack(gone))
end
local vals = redis.call('HVALS', held)
local sum = 0
for _, v in ipairs(vals) do sum = sum + tonumber(v) end
local est = redis.call('HGET', h, 'max:' .. model)
if #vals > 0 and (not est or spent + sum + tonumber(est) > ul) then
  return {2, 'usd_per_month', tostring(spent), ARGV[4], tostring(now)}
end
redis.call('HSET', held, job, est or '0')
redis.call('ZADD', till, now + tonumber(ARGV[5]), job)
redis.call('EXPIRE', held, 86400)
redis.call('EXPIRE', till, 86400)
return {1, 'reserved', '', '', tostring(now)}
"""

# Drop a job's reservation (it goes back to wait or retry; its next call reserves again).
# KEYS: in-flight hash, deadlines. ARGV: job id.
_RELEASE = """
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
return 1
"""


def keys(tenant: str) -> tuple[str, str, str]:
    """A tenant's counter hash, in-flight reservations and their deadlines."""
    base = PREFIX + tenant
    return base, base + ":held", base + ":held_until"


def day_field(day: date) -> str:
    """The counter suffix of a UTC day, as the scripts write it."""
    return day.isoformat()


def month_field(day: date) -> str:
    """The counter suffix of the UTC month of ``day``."""
    return f"{day.year:04d}-{day.month:02d}"


def resets(now: float) -> dict[str, datetime]:
    """When the day's and the month's quotas reset (UTC midnight) after Redis time ``now``."""
    today = datetime.fromtimestamp(now, UTC).date()
    tomorrow = today + timedelta(days=1)
    first = date(today.year + today.month // 12, today.month % 12 + 1, 1)
    return {
        "day": datetime(tomorrow.year, tomorrow.month, tomorrow.day, tzinfo=UTC),
        "month": datetime(first.year, first.month, first.day, tzinfo=UTC),
    }


def _reset_of(quota: str) -> str:
    return "month" if quota == "usd_per_month" else "day"


def _shown(quota: str, value: float) -> float | int:
    """A counter or limit in its quota's unit: USD for money, a count for the others."""
    return round(value / NANO, 9) if quota == "usd_per_month" else int(value)


def _limits(quota: TenantQuota) -> tuple[int, int, int]:
    """(requests/day, tokens/day, nano-USD/month) as the scripts take them; -1: none."""
    usd = quota.usd_per_month
    return (
        -1 if quota.requests_per_day is None else quota.requests_per_day,
        -1 if quota.tokens_per_day is None else quota.tokens_per_day,
        -1 if usd is None else round(usd * NANO),
    )


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass(frozen=True)
class Counted:
    """Requests counted against a tenant's day by :meth:`QuotaBook.admit`."""

    tenant: str
    day: str  # the UTC day they were counted on (Redis's clock)
    requests: int


class QuotaBook:
    """Every tenant's quotas (from the config's ``tenants``) over the counters in Redis."""

    def __init__(self, client: redis.Redis, tenants: dict[str, TenantQuota]) -> None:
        self.client = client
        self.tenants = tenants
        self._admit = client.register_script(CALENDAR + _ADMIT)
        self._refund = client.register_script(CALENDAR + _REFUND)
        self._reserve = client.register_script(CALENDAR + _RESERVE)
        self._release = client.register_script(_RELEASE)

    def quota(self, tenant: str) -> TenantQuota | None:
        """The tenant's quotas, or None when it has none (unlimited)."""
        return self.tenants.get(tenant)

    def _refused(self, reply: list[Any]) -> tuple[str, float, float, float]:
        quota, used, limit, now = (_text(v) for v in reply[1:5])
        return quota, float(used), float(limit), float(now)

    def _details(self, tenant: str, quota: str, used: float, limit: float,
                 now: float) -> dict[str, Any]:  # fmt: skip
        reset = resets(now)[_reset_of(quota)]
        return {"tenant": tenant, "quota": quota, "used": _shown(quota, used),
                "limit": _shown(quota, limit),
                "resets_at": reset.isoformat().replace("+00:00", "Z")}  # fmt: skip

    def admit(self, tenant: str, requests: int = 1) -> Counted | None:
        """Count ``requests`` new requests of ``tenant``, or raise QuotaExceededError
        (429, Retry-After: seconds to the quota's reset) when a quota is used up:
        ``usd_per_month`` or ``tokens_per_day`` reached, or ``requests_per_day`` that
        these requests would pass. None (nothing counted) for a tenant without quotas.
        Raises redis.RedisError when Redis fails."""
        quota = self.quota(tenant)
        if quota is None:
            return None
        rl, tl, ul = _limits(quota)
        reply = self._admit(keys=[keys(tenant)[0]], args=[requests, rl, tl, ul, KEEP_SECONDS])
        if int(reply[0]) == 1:
            return Counted(tenant, _text(reply[1]), requests)
        name, used, limit, now = self._refused(reply)
        details = self._details(tenant, name, used, limit, now)
        if name == "requests_per_day":
            details["requested"] = requests
        reset = resets(now)[_reset_of(name)]
        raise QuotaExceededError(
            f"tenant {tenant!r} has used its {name.replace('_', ' ')} quota "
            f"({details['used']} of {details['limit']}); nothing was queued. It resets at "
            f"{details['resets_at']}",
            details=details,
            retry_after=max(1.0, reset.timestamp() - now),
        )

    def refund(self, counted: Counted | None, requests: int | None = None) -> None:
        """Give back ``requests`` (default: all) of what :meth:`admit` counted."""
        if counted is None:
            return
        n = counted.requests if requests is None else requests
        if n > 0:
            self._refund(keys=[keys(counted.tenant)[0]], args=[counted.day, n])

    def reserve(self, tenant: str, job_id: str, model: str, hold_seconds: float) -> bool:
        """Before a provider call for ``job_id``: True when a reservation was made (the
        finish script or :meth:`release` drops it; it lapses after ``hold_seconds``),
        False when the tenant has no budget to reserve against. Raises
        BudgetExhaustedError (a quota is used up: fail the job, nothing called) or
        Throttled (calls in flight may use the budget up: ask again shortly)."""
        quota = self.quota(tenant)
        if quota is None or (quota.tokens_per_day is None and quota.usd_per_month is None):
            return False
        _rl, tl, ul = _limits(quota)
        reply = self._reserve(keys=list(keys(tenant)),
                              args=[job_id, model, tl, ul, hold_seconds])  # fmt: skip
        code = int(reply[0])
        if code == 1:
            return _text(reply[1]) == "reserved"
        name, used, limit, now = self._refused(reply)
        if code == 2:
            raise Throttled(BUDGET_WAIT_SECONDS, "budget")
        details = self._details(tenant, name, used, limit, now)
        raise BudgetExhaustedError(
            f"tenant {tenant!r} used up its {name.replace('_', ' ')} budget "
            f"({details['used']} of {details['limit']}) while the job waited; no provider "
            f"was called and nothing was billed. It resets at {details['resets_at']}",
            details=details,
        )

    def release(self, tenant: str, job_id: str) -> None:
        """Drop ``job_id``'s reservation (it goes back to wait, or to retry later). No
        Redis call for a tenant without a USD budget (it never reserves)."""
        quota = self.quota(tenant)
        if quota is None or quota.usd_per_month is None:
            return
        _h, held, till = keys(tenant)
        self._release(keys=[held, till], args=[job_id])

    def usage(self, tenant: str) -> dict[str, Any]:
        """The tenant's consumption against its limits, now (Redis's clock):
        ``{tenant, as_of, requests_today, tokens_today, usd_this_month}``, each
        ``{used, limit, resets_at}``. ``limit`` null: unlimited. ``requests_today.used``
        is null for a tenant without quotas (its requests are not counted)."""
        secs, micros = self.client.time()
        now = secs + micros / 1e6
        today = datetime.fromtimestamp(now, UTC).date()
        h = keys(tenant)[0]
        raw = self.client.hmget(h, [f"req:{day_field(today)}", f"tok:{day_field(today)}",
                                    f"usd:{month_field(today)}"])  # fmt: skip
        req, tok, usd = (int(v) if v is not None else 0 for v in raw)
        quota = self.quota(tenant) or TenantQuota()
        reset = {k: v.isoformat().replace("+00:00", "Z") for k, v in resets(now).items()}
        return {
            "tenant": tenant,
            "as_of": datetime.fromtimestamp(now, UTC).isoformat().replace("+00:00", "Z"),
            "requests_today": {"used": req if tenant in self.tenants else None,
                               "limit": quota.requests_per_day, "resets_at": reset["day"]},
            "tokens_today": {"used": tok, "limit": quota.tokens_per_day,
                             "resets_at": reset["day"]},
            "usd_this_month": {"used": round(usd / NANO, 9), "limit": quota.usd_per_month,
                               "resets_at": reset["month"]},
        }  # fmt: skip

    def known_tenants(self) -> list[str]:
        """Tenants with quotas configured or counters in Redis, sorted."""
        seen = set(self.tenants)
        for key in self.client.scan_iter(match=PREFIX + "*", count=500):
            name = _text(key)[len(PREFIX) :]
            if not name.endswith((":held", ":held_until")):
                seen.add(name)
        return sorted(seen)
