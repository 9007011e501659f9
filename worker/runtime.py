"""What a worker process builds once and every job uses: programs, models, stores."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import redis

from worker import catalog, metrics, recovery
from worker.breaker import STATES, BreakerBoard, BreakerPolicy, read_states
from worker.cache import PredictionCache
from worker.errors import ConfigError
from worker.fleet_config import FleetConfig
from worker.jobs import JobStore
from worker.lm import ModelPool
from worker.programs import ProgramRegistry
from worker.settings import WorkerSettings

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


def redis_client(url: str) -> redis.Redis:
    """A Redis client for job records, caches and heartbeats (decoded strings)."""
    return redis.Redis.from_url(
        url, decode_responses=True, socket_timeout=5, socket_connect_timeout=5,
        health_check_interval=10, retry_on_timeout=True,
    )  # fmt: skip


def build_runtime(settings: WorkerSettings, config: FleetConfig) -> Runtime:
    """Build programs (failing fast on a broken one), model pool and stores."""
    client = redis_client(settings.redis_url)
    registry = ProgramRegistry(config)
    models = ModelPool(config)
    models.warm()
    cache_client = (
        client if settings.cache_redis == settings.redis_url else redis_client(settings.cache_redis)
    )
    rt = Runtime(
        settings=settings,
        config=config,
        registry=registry,
        models=models,
        store=JobStore(client, settings.job_ttl_seconds),
        redis=client,
        breakers=BreakerBoard(client, breaker_policies(settings, config)),
        cache=PredictionCache(
            cache_client,
            l1_max_entries=settings.l1_cache_entries,
            l1_ttl=settings.l1_cache_ttl_seconds,
            lock_seconds=settings.coalesce_lock_seconds,
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


def on_heartbeat(rt: Runtime, republish: recovery.Publish) -> None:
    """Each beat: show the fleet's breaker states in this worker's gauges, republish the
    catalog (a restarted Redis may have lost it) and sweep for lost job messages.
    Raises RedisError on an outage."""
    states = read_states(rt.redis, list(rt.config.models))
    for model, state in states.items():
        metrics.BREAKER_STATE.labels(model).set(STATES.get(state, 0))
    catalog.publish(rt.redis, rt.registry.catalog())
    recovery.sweep(
        rt.redis,
        republish,
        lost_after=rt.settings.recovery_after_seconds,
        interval=rt.settings.heartbeat_seconds,
    )


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
