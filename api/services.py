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
from kombu.exceptions import OperationalError

from api import metrics
from api.errors import ServiceUnavailable
from api.settings import ApiSettings
from worker import jobs, ledger
from worker.cache import count_l2, l2_key, parse_l2, read_l2
from worker.catalog import CatalogReader
from worker.celery_config import make_celery, send_job
from worker.contract import JobMessage, utcnow
from worker.cost import CostRecord, cost_usd, price_for
from worker.fleet_config import FleetConfig
from worker.jobs import JobStore

log = logging.getLogger("dspy_fleet.api")


@dataclass(frozen=True)
class CacheHit:
    """An L2 cache entry found at submit time: answer from it instead of queueing."""

    entry: dict[str, Any]


class Services:
    """Everything a request handler needs, built once per process."""

    def __init__(self, settings: ApiSettings, config: FleetConfig) -> None:
        self.settings = settings
        self.config = config
        # Short timeouts: a Redis outage must become a quick 503, not a hung request.
        self.redis = redis.Redis.from_url(
            settings.redis_url,
            decode_responses=True,
            socket_timeout=3,
            socket_connect_timeout=2,
            health_check_interval=10,
            retry_on_timeout=False,
        )
        self.store = JobStore(self.redis, settings.job_ttl_seconds)
        self.cache_redis = (
            self.redis
            if settings.cache_redis == settings.redis_url
            else redis.Redis.from_url(settings.cache_redis, decode_responses=True,
                                      socket_timeout=1, socket_connect_timeout=1)
        )  # fmt: skip
        self.catalog = CatalogReader(self.redis, settings.catalog_ttl_seconds)
        self.celery: Celery = make_celery(settings, publisher=True)

    def submit(
        self, message: JobMessage, record: dict[str, Any], *, request_id: str | None,
        cache_key: str | None = None,
    ) -> tuple[dict[str, Any], bool] | CacheHit:  # fmt: skip
        """Record and enqueue a job once; a replayed idempotency key returns the existing job.

        Returns (job record, created), or a CacheHit when ``cache_key`` is in the L2
        cache: then nothing was recorded, and the caller answers from the entry. With
        the cache on the job store's Redis, the lookup and the record are one script.

        The job is accepted once its record, with a copy of its message, is in Redis:
        if the publish then fails, the worker's recovery sweep publishes it later
        (worker/recovery.py), so the answer is still 202. If Redis refuses the record,
        503 broker_unavailable: nothing was accepted.
        """
        kwargs = message.model_dump(mode="json", exclude_none=True)  # stored and published
        if cache_key is not None and self.cache_redis is not self.redis:
            hit = read_l2(self.cache_redis, cache_key)
            if hit is not None:
                return CacheHit(hit)
            cache_key = None
        try:
            created = self._create(message.job_id, record, kwargs, cache_key)
            if isinstance(created, CacheHit):
                return created
            if not created:
                existing = self.store.get(message.job_id)
                return existing or {**record, "job_id": message.job_id}, False
        except redis.RedisError as exc:
            raise _broker_unavailable(exc) from None
        try:
            self.enqueue(message, kwargs, request_id=request_id)
        except ServiceUnavailable:
            log.warning("job recorded but not published; the recovery sweep will publish it",
                        extra={"job_id": message.job_id})  # fmt: skip
        job = jobs.decode(jobs.encode(record))  # the same strings a later GET reads
        return {**job, "job_id": message.job_id, "status": "queued"}, True

    def _create(self, job_id: str, record: dict[str, Any], kwargs: dict[str, Any],
                cache_key: str | None) -> bool | CacheHit:  # fmt: skip
        """Create the queued job, first looking ``cache_key`` up in the same script."""
        if cache_key is None:
            return self.store.create(job_id, record, message=kwargs)
        out = self.store.create_unless_cached(job_id, record, kwargs, l2_key(cache_key))
        if not isinstance(out, str):
            count_l2("miss")
            return out
        hit = parse_l2(out)
        if hit is not None:
            count_l2("hit")
            return CacheHit(hit)
        # A corrupt entry (counted as an error by parse_l2) is a miss: create the job.
        return self.store.create(job_id, record, message=kwargs)

    def serve_cached(
        self, message: JobMessage, record: dict[str, Any], hit: dict[str, Any], *, started: float
    ) -> dict[str, Any]:
        """Record a job that was born finished from an L2 cache entry, billed once at cost 0."""
        model = self.config.models[record["model"]]
        price = price_for(model, use_litellm_map=False)
        saved_in, saved_out = int(hit.get("input_tokens") or 0), int(hit.get("output_tokens") or 0)
        cost = CostRecord(
            model=record["model"], provider_model=model.litellm_model, input_tokens=0,
            output_tokens=0, cost_usd=0.0, cached=True,
            latency_ms=round((time.perf_counter() - started) * 1000, 2), attempts=0,
            variant=record["variant"], saved_input_tokens=saved_in, saved_output_tokens=saved_out,
            saved_cost_usd=cost_usd(price, saved_in, saved_out),
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
            raise _broker_unavailable(exc) from None
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
        except (OperationalError, redis.RedisError, OSError) as exc:
            raise _broker_unavailable(exc) from None
        metrics.JOBS_ENQUEUED.labels(message.priority).inc()


def _broker_unavailable(exc: Exception) -> ServiceUnavailable:
    log.warning("broker refused a job: %s", exc)
    return ServiceUnavailable(
        "the job queue is unavailable; the job was not accepted, retry shortly",
        code="broker_unavailable",
        details={"reason": type(exc).__name__},
    )


def init_app(app: Flask, settings: ApiSettings, config: FleetConfig) -> None:
    """Attach the services to the app."""
    app.extensions["dspy_fleet"] = Services(settings, config)


def services() -> Services:
    """The services of the current app."""
    svc: Any = current_app.extensions["dspy_fleet"]
    return svc
