"""What a worker process builds once and every job uses: programs, models, stores."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import redis

from worker import catalog
from worker.cache import PredictionCache
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
    cache_client = (
        client if settings.cache_redis == settings.redis_url else redis_client(settings.cache_redis)
    )
    rt = Runtime(
        settings=settings,
        config=config,
        registry=registry,
        models=ModelPool(config),
        store=JobStore(client, settings.job_ttl_seconds),
        redis=client,
        cache=PredictionCache(
            cache_client,
            l1_max_entries=settings.l1_cache_entries,
            l1_ttl=settings.l1_cache_ttl_seconds,
            lock_seconds=settings.coalesce_lock_seconds,
        ),
    )
    publish_catalog(rt)
    return rt


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
