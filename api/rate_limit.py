"""A request-rate limit per tenant: a token bucket in Redis, shared by every API process.

The bucket lives in Redis, not in each process: a rate is a promise about the fleet
("tenant X sends at most R requests per second"), and per-process buckets would make
it R × processes × replicas, shifting with every scale-up and with how the load
balancer spreads connections. The cost is one small script per authenticated request
(a round trip on the Redis the request uses anyway), paid only when the limit is on:
it is off by default (DSPY_FLEET_RATE_LIMIT_PER_SECOND=0). The clock is Redis's own
(TIME), so API hosts with skewed clocks share one bucket correctly.

A Redis error while checking lets the request through: the limit protects the fleet
from a greedy tenant, and must not turn a Redis blip into an outage of cheap requests.
Requests without a tenant (public probes, /metrics) are never counted.
"""

from __future__ import annotations

import logging

import redis
from flask import Flask, g, request

from api import metrics
from api.auth import PUBLIC_PATHS, PUBLIC_PREFIXES
from api.settings import ApiSettings
from dspy_fleet.errors import RateLimitedError

log = logging.getLogger("dspy_fleet.api")

# One hash per tenant: its tokens and when they were last counted (Redis clock).
KEY_PREFIX = "dspy_fleet:rate:"

# Refill the bucket by the time elapsed, then take one token if there is one.
# Returns {1, "0"} when allowed, else {0, seconds until a token is back} (floats as
# strings: Redis truncates Lua numbers to integers). The key expires once a full
# bucket would have refilled, so idle tenants leave nothing behind.
_TAKE = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(state[1]) or burst
local at = tonumber(state[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - at) * rate)
local allowed = 0
local wait = 0
if tokens >= 1 then
  tokens = tokens - 1
  allowed = 1
else
  wait = (1 - tokens) / rate
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate * 1000) + 1000)
return {allowed, tostring(wait)}
"""


class RateLimiter:
    """Takes one token per request from the tenant's bucket; 429 when it is empty."""

    def __init__(self, client: redis.Redis, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = burst
        self._take = client.register_script(_TAKE)

    def check(self, tenant: str) -> None:
        """Count one request of ``tenant``; RateLimitedError when over its rate."""
        try:
            allowed, wait = self._take(keys=[KEY_PREFIX + tenant], args=[self.rate, self.burst])
        except redis.RedisError as exc:
            log.warning("rate limit not checked (Redis: %s); request let through", exc)
            return
        if int(allowed):
            return
        metrics.LIMITED.labels("rate").inc()
        raise RateLimitedError(
            f"tenant {tenant!r} is over its rate limit of {self.rate:g} requests per second",
            details={"limit": "tenant_rate", "rate_per_second": self.rate, "burst": self.burst},
            retry_after=float(wait),
        )


def init_app(app: Flask, settings: ApiSettings, client: redis.Redis) -> None:
    """Check every authenticated request against its tenant's bucket (when a rate is set).

    Must be installed after auth.init_app: it reads the tenant auth found.
    """
    if not settings.rate_limit_per_second:
        return
    limiter = RateLimiter(client, settings.rate_limit_per_second, settings.rate_burst)

    @app.before_request
    def _rate_limit() -> None:
        tenant = g.get("tenant")
        # Probes and scrapers are public (and tenant-less unless the API runs open).
        public = request.path in PUBLIC_PATHS or request.path.startswith(PUBLIC_PREFIXES)
        if tenant and not public:
            limiter.check(tenant)
