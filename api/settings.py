"""Typed settings of the API process (env prefix DSPY_FLEET_), parsed once at start-up."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, SecretStr, model_validator

from dspy_fleet.settings import CommonSettings

# File descriptors an evented API process needs besides its client connections: its Redis
# and broker pools, the pub/sub listener, logs, metrics files, the listening socket.
FD_OVERHEAD = 256


class ApiSettings(CommonSettings):
    """Settings of an API process."""

    api_host: str = "127.0.0.1"
    api_port: int = Field(default=8080, ge=1, le=65535)
    # gunicorn: a few processes; each serves many connections at once. "gevent" (the
    # default) serves each connection on a greenlet, so a held `wait` costs a greenlet
    # and a socket, not an OS thread; "gthread" is the thread pool of earlier releases.
    api_worker_class: Literal["gevent", "gthread"] = "gevent"
    api_workers: int = Field(default=2, ge=1, le=64)
    # gevent: connections one process serves at once (gunicorn's worker_connections).
    api_connections: int = Field(default=4096, ge=4, le=65536)
    # gthread: threads per process; a held request holds one.
    api_threads: int = Field(default=16, ge=1, le=256)
    max_body_bytes: int = Field(default=1_048_576, ge=1024)
    max_wait_seconds: float = Field(default=60.0, ge=0, le=60)
    # A worker counts as live when it beat within this many seconds.
    worker_max_age_seconds: float = Field(default=15.0, gt=0)
    # "tenant:sha256hex[:admin],..." (see api/auth.py); empty = open API (refused in production).
    api_keys: SecretStr = Field(default=SecretStr(""))
    # Items one POST /v1/batches may hold (the body limit applies too).
    max_batch_items: int = Field(default=10_000, ge=1, le=100_000)
    # How stale the API's copy of the worker-published program catalog may be.
    catalog_ttl_seconds: float = Field(default=2.0, ge=0)
    # Held requests (`wait`) per API process, in total and per tenant (api/limits.py).
    # None derives them from the process's slots (connections or threads) so that waits
    # can never take every slot.
    max_waits: int | None = Field(default=None, ge=0)
    max_waits_per_tenant: int | None = Field(default=None, ge=0)
    # Redis connections one API process may open for requests (a bounded pool: thousands
    # of greenlets must not open thousands of connections); the wait subscriber takes one.
    api_redis_connections: int = Field(default=64, ge=2, le=10_000)
    # Acceptance that survives a Redis failover (README, Redis Sentinel): before a 202 the
    # API waits (Redis WAIT) until this many replicas have the job; 0 = off (asynchronous
    # replication: a failover may lose jobs accepted in its last instants).
    accept_min_replicas: int = Field(
        default=0,
        ge=0,
        le=16,
        description="Replicas that must have a job's record before 202 (Redis WAIT); 0 = off.",
    )
    accept_replica_timeout_ms: int = Field(
        default=1000,
        ge=1,
        le=60_000,
        description="Longest wait (ms) for accept_min_replicas; past it 503 "
        "replication_unconfirmed (the job is recorded and may still run).",
    )
    # Event streams (api/routes/events.py): the longest one stream stays open (the client
    # then resumes with Last-Event-ID), the keep-alive comment's interval when nothing
    # happens, and the least time between two recounts of a batch stream (its items' ends
    # wake it).
    events_max_seconds: float = Field(default=300.0, ge=1, le=3600)
    events_keepalive_seconds: float = Field(default=15.0, ge=0.1, le=300)
    events_batch_poll_seconds: float = Field(default=1.0, ge=0.1, le=60)
    # Requests per second per tenant, fleet-wide in Redis (api/rate_limit.py); 0 = off.
    rate_limit_per_second: float = Field(default=0.0, ge=0)
    # Requests a tenant may send at once above the rate; None = 2 s worth of the rate.
    rate_limit_burst: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _waits_leave_slots(self) -> ApiSettings:
        # A full wait cap must leave a slot for cheap requests (GET /v1/programs, probes).
        if self.max_waits is not None and self.max_waits >= self.slots:
            raise ValueError(
                f"DSPY_FLEET_MAX_WAITS ({self.max_waits}) must be below {self.slots_setting} "
                f"({self.slots}): held requests would leave no "
                f"{'connection' if self.api_worker_class == 'gevent' else 'thread'} "
                "for cheap ones"
            )
        if self.max_waits_per_tenant is not None and self.max_waits_per_tenant > self.wait_cap:
            raise ValueError(
                f"DSPY_FLEET_MAX_WAITS_PER_TENANT ({self.max_waits_per_tenant}) must not exceed "
                f"DSPY_FLEET_MAX_WAITS ({self.wait_cap})"
            )
        return self

    @property
    def slots(self) -> int:
        """Requests one API process serves at once: its connections under gevent, its
        threads under gthread."""
        return self.api_connections if self.api_worker_class == "gevent" else self.api_threads

    @property
    def slots_setting(self) -> str:
        """The variable that sets ``slots``, for error messages."""
        if self.api_worker_class == "gevent":
            return "DSPY_FLEET_API_CONNECTIONS"
        return "DSPY_FLEET_API_THREADS"

    @property
    def wait_cap(self) -> int:
        """Held requests one API process allows: MAX_WAITS, else the slots minus a reserve
        (3,072 of gevent's 4,096 connections; 12 of gthread's 16 threads)."""
        if self.max_waits is not None:
            return self.max_waits
        # A quarter of the slots (at least 2) stay free for requests that do not wait.
        return max(0, self.slots - max(2, self.slots // 4))

    @property
    def tenant_wait_cap(self) -> int:
        """Held requests one tenant may have in one API process (default: half the total;
        the whole total in open mode, where every caller is the one anonymous tenant)."""
        if self.max_waits_per_tenant is not None:
            return self.max_waits_per_tenant
        if not self.api_keys.get_secret_value():
            return self.wait_cap
        return max(1, self.wait_cap // 2) if self.wait_cap else 0

    @property
    def fds_needed(self) -> int:
        """File descriptors one API process needs at its full load (RLIMIT_NOFILE)."""
        return self.slots + self.api_redis_connections + FD_OVERHEAD

    @property
    def rate_burst(self) -> int:
        """The token bucket's size: RATE_LIMIT_BURST, else two seconds of the rate."""
        if self.rate_limit_burst is not None:
            return self.rate_limit_burst
        return max(1, math.ceil(2 * self.rate_limit_per_second))
