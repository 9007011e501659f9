"""What a worker process builds once and every job uses: programs, models, stores."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import redis

from dspy_fleet.errors import ConfigError
from dspy_fleet.fleet_config import FleetConfig
from dspy_fleet.settings import WorkerSettings
from dspy_fleet.store import catalog, connection
from dspy_fleet.store.breakers import BreakerBoard, BreakerPolicy
from dspy_fleet.store.cache import PredictionCache
from dspy_fleet.store.causes import CauseBook
from dspy_fleet.store.jobs import JobStore
from dspy_fleet.store.leases import LeaseKeeper
from dspy_fleet.store.pacing import Pacer, scopes_for
from dspy_fleet.store.quotas import QuotaBook
from worker import metrics
from worker.lm import ModelPool
from worker.programs import ProgramRegistry

log = logging.getLogger("dspy_fleet.worker")


@dataclass
class Runtime:
    """Per-process dependencies of the runner."""

    settings: WorkerSettings
    config: FleetConfig
    registry: ProgramRegistry
    models: ModelPool
    store: JobStore
    redis: redis.Redis
    cache: PredictionCache
    breakers: BreakerBoard
    leases: LeaseKeeper
    pacer: Pacer
    causes: CauseBook
    quotas: QuotaBook


def redis_client(url: str, settings: WorkerSettings) -> redis.Redis:
    """A Redis client for job records, caches and heartbeats (decoded strings).

    Connect and read timeouts from the settings: a hung Redis fails the job's command
    (the task hands its message back) instead of holding a worker thread. One retry on
    a timeout or dropped connection: a worker is not answering anyone meanwhile.
    """
    return connection.redis_client(
        url, sentinel_password=settings.sentinel_secret, decode_responses=True,
        health_check_interval=10, retry_on_timeout=True, **settings.redis_timeouts,
    )  # fmt: skip


def build_runtime(settings: WorkerSettings, config: FleetConfig) -> Runtime:
    """Build programs (failing fast on a broken one), model pool and stores."""
    client = redis_client(settings.redis_url, settings)
    registry = ProgramRegistry(config)
    models = ModelPool(config)
    models.warm()
    cache_client = (
        client
        if settings.cache_redis == settings.redis_url
        else redis_client(settings.cache_redis, settings)
    )
    rt = Runtime(
        settings=settings,
        config=config,
        registry=registry,
        models=models,
        store=JobStore(
            client,
            settings.job_ttl_seconds,
            recovery_after=settings.recovery_after_seconds,
            lease_seconds=settings.lease_seconds,
        ),  # fmt: skip
        leases=LeaseKeeper(client, settings.lease_seconds),
        redis=client,
        breakers=BreakerBoard(
            client, breaker_policies(settings, config), max_call_seconds=settings.time_limit
        ),
        pacer=Pacer(
            client,
            scopes_for(config),
            interactive_share=settings.interactive_share,
            burst_seconds=settings.rate_burst_seconds,
            horizon_seconds=settings.pacing_horizon_seconds,
        ),
        causes=CauseBook(client),
        quotas=QuotaBook(client, config.tenants),
        cache=PredictionCache(
            cache_client,
            l1_max_entries=settings.l1_cache_entries,
            l1_ttl=settings.l1_cache_ttl_seconds,
            lock_seconds=settings.coalesce_lock_seconds,
            # A follower waits, and a leader's lock is renewed, at most the job's time limit.
            max_wait=settings.time_limit,
            count=metrics.count_cache_op,
        ),
    )
    publish_catalog(rt)
    return rt


def breaker_policies(settings: WorkerSettings, config: FleetConfig) -> dict[str, BreakerPolicy]:
    """Each model's breaker thresholds: the settings' defaults, then the model's overrides."""
    base = {f: getattr(settings, f"breaker_{f}") for f in BreakerPolicy.__dataclass_fields__}
    policies = {}
    for alias, model in config.models.items():
        policy = BreakerPolicy(**{**base, **model.breaker.model_dump(exclude_none=True)})
        if policy.success_threshold > policy.half_open_max_calls:
            raise ConfigError(
                f"models.{alias}.breaker: success_threshold must be <= half_open_max_calls"
            )
        policies[alias] = policy
    return policies


def on_heartbeat(rt: Runtime) -> None:
    """Each beat: republish the catalog (a restarted Redis may have lost it). Raises
    RedisError on an outage."""
    catalog.publish(rt.redis, rt.registry.catalog())


def publish_catalog(rt: Runtime) -> None:
    """Tell the API what this worker loaded; a Redis outage here is logged, not fatal."""
    try:
        catalog.publish(rt.redis, rt.registry.catalog())
    except redis.RedisError as exc:
        log.warning("could not publish the program catalog: %s", exc)


_runtime: Runtime | None = None
_lock = threading.Lock()


def get_runtime(settings: WorkerSettings, config: FleetConfig) -> Runtime:
    """The process's Runtime, built on first use (after fork under prefork)."""
    global _runtime
    if _runtime is None:
        with _lock:
            if _runtime is None:
                _runtime = build_runtime(settings, config)
    return _runtime
