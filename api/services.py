"""The API's connections to the outside: Redis, the job store and the Celery publisher.

Each has an ``init_app`` (flaskr style) and lives in ``app.extensions``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import redis
from celery import Celery
from flask import Flask, current_app

from api import metrics
from api.settings import ApiSettings
from api.waiter import JobWaiter
from dspy_fleet.broker.backends import PUBLISH_ERRORS, Broker, broker_for
from dspy_fleet.broker.celery_config import make_celery, send_job
from dspy_fleet.contract import JobMessage, utcnow
from dspy_fleet.cost import CostRecord, price_for
from dspy_fleet.errors import (
    BrokerUnavailableError,
    RedisUnavailableError,
    ReplicationUnconfirmedError,
)
from dspy_fleet.fleet_config import FleetConfig
from dspy_fleet.store import connection, jobs, ledger, replication
from dspy_fleet.store.cache import l2_key, parse_l2, read_l2
from dspy_fleet.store.catalog import CatalogReader
from dspy_fleet.store.feedback import FeedbackStore
from dspy_fleet.store.jobs import JobStore
from dspy_fleet.store.quotas import Counted, QuotaBook
from dspy_fleet.store.traces import TraceStore
from dspy_fleet.webhooks.urls import AllowList

log = logging.getLogger("dspy_fleet.api")

# Longest a request waits for a free connection of its process's Redis pool before
# 503 redis_unavailable (a hung Redis frees each connection within its read timeout).
POOL_WAIT_SECONDS = 30.0


@dataclass(frozen=True)
class CacheHit:
    """An L2 cache entry found at submit time: answer from it instead of queueing."""

    entry: dict[str, Any]


class Services:
    """Everything a request handler needs, built once per process."""

    def __init__(self, settings: ApiSettings, config: FleetConfig) -> None:
        self.settings = settings
        self.config = config
        # Short timeouts and no retries: a Redis outage must become a quick 503, not a
        # hung request (the bound is in README, Reliability: redis_timeout_seconds each).
        # A bounded pool: under gevent a burst of thousands of requests would otherwise
        # open a connection each (and keep them all, idle, for good). Past the bound a
        # request waits for a free connection, up to POOL_WAIT_SECONDS: in a burst that
        # wait is for the CPU (a greenlet holds its connection until it runs again), as a
        # request queued for a thread would. The waiter's subscriber holds one for good.
        self.redis = bounded_client(
            settings.redis_url,
            settings.api_redis_connections,
            timeout=POOL_WAIT_SECONDS,
            decode_responses=True,
            health_check_interval=10,
            retry_on_timeout=False,
            sentinel_password=settings.sentinel_secret,
            **settings.redis_timeouts,
        )
        self.store = JobStore(self.redis, settings.job_ttl_seconds,
                              recovery_after=settings.recovery_after_seconds)  # fmt: skip
        # A separate cache Redis is only a fast path: its timeout is capped at 1 s.
        cache_timeout = min(1.0, settings.redis_timeout_seconds)
        self.cache_redis = (
            self.redis
            if settings.cache_redis == settings.redis_url
            else bounded_client(settings.cache_redis, settings.api_redis_connections,
                                timeout=POOL_WAIT_SECONDS, decode_responses=True,
                                socket_timeout=cache_timeout,
                                socket_connect_timeout=cache_timeout,
                                sentinel_password=settings.sentinel_secret)
        )  # fmt: skip
        self.catalog = CatalogReader(self.redis, settings.catalog_ttl_seconds)
        self.quotas = QuotaBook(self.redis, config.tenants)
        # Feedback and the A/B report's samples (api/routes/feedback.py).
        self.feedback = FeedbackStore(self.redis)
        # Kept program traces and the examples built from them (api/routes/traces.py).
        self.traces = TraceStore(self.redis)
        # Wakes long-polling requests; made on first use (api/routes/predictions.py).
        self.waiter: JobWaiter | None = None
        self.celery: Celery = make_celery(settings, publisher=True)
        # The broker's own questions (queue lengths, readiness, "published" marks).
        self.broker: Broker = broker_for(settings.broker, timeout=settings.redis_timeout_seconds,
                                         sentinel_password=settings.sentinel_secret)  # fmt: skip
        # DSPY_FLEET_CALLBACK_ALLOW (validated with the settings), for the SSRF guard.
        self.callback_allow = AllowList.parse(settings.callback_allow)

    def admit(self, tenant: str, requests: int = 1) -> Counted | None:
        """Count ``requests`` against the tenant's quotas before anything is queued: raises
        QuotaExceededError (429) when one is used up, RedisUnavailableError (503) when Redis
        fails. None for a tenant without quotas."""
        try:
            return self.quotas.admit(tenant, requests)
        except redis.RedisError as exc:
            raise _redis_unavailable(exc) from None

    def refund(self, counted: Counted | None, requests: int | None = None) -> None:
        """Give back counted requests that were not accepted (a replay, a refused record);
        a Redis failure leaves them counted (the tenant's loss, logged)."""
        try:
            self.quotas.refund(counted, requests)
        except redis.RedisError as exc:
            log.warning("could not give back requests counted against a quota: %s", exc)

    def submit(
        self, message: JobMessage, record: dict[str, Any], *, request_id: str | None,
        cache_key: str | None = None,
    ) -> tuple[dict[str, Any], bool] | CacheHit:  # fmt: skip
        """Record and enqueue a job once; a replayed idempotency key returns the existing job.

        Returns (job record, created), or a CacheHit when ``cache_key`` is in the L2
        cache: then nothing was recorded, and the caller answers from the entry. With
        the cache on the job store's Redis, the lookup and the record are one script.

        The job is accepted once its record, with a copy of its message, is in Redis:
        if the publish then fails, the workers' due sweep publishes it later
        (worker/recovery.py), so the answer is still 202. If Redis refuses the record,
        503 redis_unavailable: nothing was accepted.
        """
        kwargs = message.model_dump(mode="json", exclude_none=True)  # stored and published
        if cache_key is not None and self.cache_redis is not self.redis:
            hit = read_l2(self.cache_redis, cache_key, metrics.count_cache_op)
            if hit is not None:
                return CacheHit(hit)
            cache_key = None
        existing: dict[str, Any] | None = None
        try:
            created = self._create(message.job_id, record, kwargs, cache_key)
            if isinstance(created, CacheHit):
                return created
            if not created:
                existing = self.store.get(message.job_id)
        except redis.RedisError as exc:
            raise _redis_unavailable(exc) from None
        if not created:
            # A replay: its first answer may have been this 503 (not yet on a replica).
            self.confirm_replicated({"job_id": message.job_id})
            return existing or {**record, "job_id": message.job_id}, False
        try:
            self.enqueue(message, kwargs, request_id=request_id)
        except BrokerUnavailableError:
            log.warning("job recorded but not published; the due sweep will publish it",
                        extra={"job_id": message.job_id})  # fmt: skip
        self.confirm_replicated({"job_id": message.job_id})
        job = jobs.decode(jobs.encode(record))  # the same strings a later GET reads
        return {**job, "job_id": message.job_id, "status": "queued"}, True

    def confirm_replicated(self, details: dict[str, Any]) -> None:
        """With DSPY_FLEET_ACCEPT_MIN_REPLICAS > 0, wait until that many replicas have every
        write this process finished so far (the job records and, with the broker on the
        same Redis, their messages); else 503 replication_unconfirmed with ``details``
        (the job ids): the jobs are recorded on the master and may still run, and a retry
        with the same request_id or Idempotency-Key returns them, never second copies."""
        wanted = self.settings.accept_min_replicas
        if wanted <= 0:
            return
        timeout_ms = self.settings.accept_replica_timeout_ms
        try:
            acked = replication.confirm(self.redis, wanted, timeout_ms)
        except redis.RedisError as exc:
            acked, reason = 0, type(exc).__name__
        else:
            reason = "timeout"
        if acked >= wanted:
            return
        log.warning("accepted job not confirmed by enough replicas", extra=details)
        raise ReplicationUnconfirmedError(
            f"the job was recorded but {acked} of the {wanted} replicas required confirmed it "
            f"within {timeout_ms} ms; it may still run: retry with the same request_id "
            "(or Idempotency-Key) to get it, never a second copy",
            details={**details, "replicas_confirmed": acked, "replicas_required": wanted,
                     "reason": reason},
        )  # fmt: skip

    def _create(self, job_id: str, record: dict[str, Any], kwargs: dict[str, Any],
                cache_key: str | None) -> bool | CacheHit:  # fmt: skip
        """Create the queued job, first looking ``cache_key`` up in the same script."""
        if cache_key is None:
            return self.store.create(job_id, record, message=kwargs)
        out = self.store.create_unless_cached(job_id, record, kwargs, l2_key(cache_key))
        if not isinstance(out, str):
            metrics.count_cache_op("l2", "miss")
            return out
        hit = parse_l2(out, metrics.count_cache_op)
        if hit is not None:
            metrics.count_cache_op("l2", "hit")
            return CacheHit(hit)
        # A corrupt entry (counted as an error by parse_l2) is a miss: create the job.
        return self.store.create(job_id, record, message=kwargs)

    def serve_cached(
        self, message: JobMessage, record: dict[str, Any], hit: dict[str, Any], *, started: float
    ) -> dict[str, Any]:
        """Record a job that was born finished from an L2 cache entry, billed once at cost 0."""
        model = self.config.models[record["model"]]
        # No price table here (the API never imports litellm): only configured prices.
        cost = CostRecord.cache_hit(
            record["model"], model, hit, price=price_for(model),
            latency_ms=round((time.perf_counter() - started) * 1000, 2), attempts=0,
            variant=record["variant"],
        ).to_dict()  # fmt: skip
        now = utcnow()
        fields = {**record, "status": "succeeded", "outputs": hit["outputs"], "cost": cost,
                  "started_at": now, "finished_at": now, "attempts": 0}  # fmt: skip
        dims = (record["model"], record["variant"] or "none", record["program"], record["tenant"])
        bill = ledger.make_bill(cost, status="succeeded", dims=dims, day=now.date())
        try:
            created = self.store.create(message.job_id, fields, bill=bill)
            existing = None if created else self.store.get(message.job_id)
        except redis.RedisError as exc:
            raise _redis_unavailable(exc) from None
        if existing is not None:
            return existing
        return {**jobs.decode(jobs.encode(fields)), "job_id": message.job_id}

    def enqueue(self, message: JobMessage, kwargs: dict[str, Any], *,
                request_id: str | None) -> None:  # fmt: skip
        """Publish ``kwargs`` (``message`` as JSON) by task name; 503 broker_unavailable if
        the broker is down."""
        try:
            send_job(
                self.celery,
                kwargs,
                job_id=message.job_id,
                queue=message.priority,
                request_id=request_id,
            )
        except PUBLISH_ERRORS as exc:
            # Any broker error, not only a lost connection (a deleted vhost is AMQP's
            # NotAllowed): the job was not published, and 503 says so.
            raise _broker_unavailable(exc) from None
        metrics.JOBS_ENQUEUED.labels(message.priority).inc()
        try:
            self.broker.mark_published(self.redis, [message.job_id])
        except redis.RedisError as exc:
            # Unmarked, the due sweep publishes it once more: a duplicate, harmless.
            log.warning("could not mark a job published: %s", exc)


def bounded_client(url: str, max_connections: int, *, timeout: float, **kwargs: Any) -> redis.Redis:
    """A Redis client on a pool of at most ``max_connections`` connections; a command that
    finds them all busy waits up to ``timeout`` seconds for one, then raises
    redis.ConnectionError. ``kwargs`` are the connections' options, as for from_url, plus
    ``sentinel_password`` for a redis+sentinel:// URL (dspy_fleet/store/connection.py)."""
    return connection.redis_client(
        url, max_connections=max_connections, pool_timeout=timeout, **kwargs
    )


def _broker_unavailable(exc: Exception) -> BrokerUnavailableError:
    log.warning("broker refused a job: %s", exc)
    return BrokerUnavailableError(
        "the job queue is unavailable; the job was not accepted, retry shortly",
        details={"reason": type(exc).__name__},
    )


def _redis_unavailable(exc: Exception) -> RedisUnavailableError:
    log.warning("Redis refused a job record: %s", exc)
    return RedisUnavailableError(
        "the job store is unavailable; the job was not accepted, retry shortly",
        details={"reason": type(exc).__name__},
    )


def init_app(app: Flask, settings: ApiSettings, config: FleetConfig) -> None:
    """Attach the services to the app."""
    app.extensions["dspy_fleet"] = Services(settings, config)


def services() -> Services:
    """The services of the current app."""
    svc: Any = current_app.extensions["dspy_fleet"]
    return svc
