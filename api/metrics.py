"""Every Prometheus metric the API exports (SPEC §4), in one place.

Under gunicorn the API runs several worker processes; prometheus-client's
multiprocess mode (PROMETHEUS_MULTIPROC_DIR, set by api/gunicorn_conf.py) makes
/metrics report all of them, whichever worker answers the scrape.

Some families describe the fleet rather than this process, and are read when scraped:
``dspy_queue_length`` (the broker's queues), ``dspy_circuit_breaker_state`` (the
breakers' shared state in Redis) and ``dspy_rate_limit_effective_rpm`` /
``dspy_rate_limit_configured_rpm`` (the pacer's). The API is their one exporter: the
workers export none, so Prometheus gets one copy per API replica (the rules and panels take the
max over replicas), not one per worker.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import redis
from flask import Flask, current_app, has_app_context
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, multiprocess
from prometheus_client.core import GaugeMetricFamily

from dspy_fleet.broker.backends import PUBLISH_ERRORS, Broker, broker_for
from dspy_fleet.contract import QUEUES
from dspy_fleet.store.breakers import STATES
from dspy_fleet.store.cache import operations_counter

log = logging.getLogger("dspy_fleet.api.metrics")

REQUESTS = Counter(
    "dspy_api_requests_total", "HTTP requests answered.", ["endpoint", "method", "status"]
)
# Most answers take a few ms; wait=N requests are held up to 60 s.
REQUEST_DURATION = Histogram(
    "dspy_api_request_duration_seconds",
    "Time to answer an HTTP request.",
    ["endpoint"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
# The API's own cache lookups (the submit fast path reads L2); the worker counts its own.
CACHE_OPERATIONS = operations_counter()
# Requests a fair-share limit touched (api/limits.py, api/rate_limit.py); limit is one of
# wait_tenant / wait_total (served without waiting) or rate (answered 429).
LIMITED = Counter(
    "dspy_api_limited_total", "Requests a per-tenant or total limit applied to.", ["limit"]
)
# Feedback posted on predictions (POST /v1/predictions/<id>/feedback), by the prediction's
# program and variant; a re-post from the same source counts again. The score histogram's
# buckets suit the 0..1 convention; scores on other scales land in +Inf (or the first).
FEEDBACK = Counter("dspy_feedback_total", "Feedback posted on predictions.", ["program", "variant"])
FEEDBACK_SCORE = Histogram(
    "dspy_feedback_score",
    "Feedback scores posted on predictions (0..1 by convention).",
    ["program", "variant"],
    buckets=(0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0),
)
JOBS_ENQUEUED = Counter("dspy_jobs_enqueued_total", "Jobs published to the broker.", ["queue"])
# Requests held by `wait` right now (api/limits.py), summed over the live gunicorn workers.
WAITS_HELD = Gauge(
    "dspy_api_waits_held",
    "Requests held by wait right now.",
    multiprocess_mode="livesum",
)
# Event streams open right now (api/routes/events.py), summed over the live gunicorn workers.
STREAMS_OPEN = Gauge(
    "dspy_api_event_streams_open",
    "Server-Sent Event streams open right now.",
    multiprocess_mode="livesum",
)
# Jobs whose held requests were woken (api/waiter.py), by what woke them: "notification"
# (the finish script's PUBLISH) or "sweep" (the fallback read found the job ended: a
# notification that never came; a steady rate of these means notifications are lost).
WAIT_WAKEUPS = Counter(
    "dspy_api_wait_wakeups_total", "Waited-for jobs found ended, by source.", ["source"]
)
# Sampled by whichever gunicorn worker answers the scrape; "mostrecent" makes
# the merged value that latest sample instead of a sum over the workers.
QUEUE_LENGTH = Gauge(
    "dspy_queue_length",
    "Messages waiting in a broker queue (sampled at scrape time).",
    ["queue"],
    multiprocess_mode="mostrecent",
)


class QueueSampler:
    """Reads the broker's queue lengths through its interface (dspy_fleet/broker/backends.py):
    one pipelined round-trip of LLENs with Redis, a passive queue.declare per queue with
    RabbitMQ."""

    def __init__(self, broker_url: str, sentinel_password: str | None = None) -> None:
        # Short timeouts: a slow broker must not hold up the scrape.
        self.broker: Broker = broker_for(broker_url, timeout=1.0,
                                         sentinel_password=sentinel_password)  # fmt: skip
        self._lock = threading.Lock()

    def sample(self) -> None:
        """Set dspy_queue_length for every queue; on a broker error keep the last values."""
        with self._lock:
            try:
                lengths = self.broker.queue_lengths(QUEUES)
            except PUBLISH_ERRORS as exc:
                log.warning("could not sample queue lengths: %s", exc)
                return
        for queue, length in lengths.items():
            QUEUE_LENGTH.labels(queue).set(length)


# Reads the fleet's breaker states (model -> "closed"/"open"/"half_open") from Redis.
BreakerStates = Callable[[], Mapping[str, str]]


class BreakerStateCollector:
    """``dspy_circuit_breaker_state{model}``: the fleet's shared breaker states, read
    from Redis when scraped, for every configured model (0 closed, 1 open, 2 half-open).

    A gauge each worker set would show what that worker last saw: stale while no
    traffic comes (open long after the recovery window), never right for a model that
    worker did not call (a fallback), and one copy per worker. Reading the shared state
    at scrape time, in the API only, has none of these faults. An open breaker whose
    recovery window has passed reads half-open (dspy_fleet.store.breakers.read_states).
    """

    def __init__(self, read: BreakerStates) -> None:
        self.read = read

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """One sample per model; none while Redis cannot say (absent beats wrong)."""
        try:
            states = self.read()
        except redis.RedisError as exc:
            log.warning("breaker states unavailable for /metrics: %s", exc)
            return
        family = GaugeMetricFamily(
            "dspy_circuit_breaker_state",
            "Circuit breaker state: 0 closed, 1 open, 2 half-open.",
            labels=["model"],
        )
        for model, state in sorted(states.items()):
            family.add_metric([model], STATES.get(state, 0))
        yield family


# Reads each model's effective and configured requests/min (None: unlimited) from Redis.
RateLimits = Callable[[], Mapping[str, tuple[float | None, int | None]]]


class RateLimitCollector:
    """``dspy_rate_limit_effective_rpm{model}``: the requests/min the fleet paces each model
    at now (after 429 cuts and the climb back; the lowest of its own and its account's), and
    ``dspy_rate_limit_configured_rpm{model}``: what the models file allows. Read from the
    pacer's shared state in Redis at scrape time, in the API only (as the breaker states,
    and for the same reasons). A model without a limit (none configured, none learned from
    a 429) has no sample: unlimited is not a number to graph."""

    def __init__(self, read: RateLimits) -> None:
        self.read = read

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """One sample per limited model; none while Redis cannot say."""
        try:
            rates = self.read()
        except redis.RedisError as exc:
            log.warning("pacing rates unavailable for /metrics: %s", exc)
            return
        effective = GaugeMetricFamily(
            "dspy_rate_limit_effective_rpm",
            "Requests per minute the fleet paces the model at now (after cuts and growth).",
            labels=["model"],
        )
        configured = GaugeMetricFamily(
            "dspy_rate_limit_configured_rpm",
            "Requests per minute configured for the model (its own or its account's rpm).",
            labels=["model"],
        )
        for model, (rpm, limit) in sorted(rates.items()):
            if rpm is not None:
                effective.add_metric([model], rpm)
            if limit is not None:
                configured.add_metric([model], limit)
        yield effective
        yield configured


class _DefaultRegistry:
    """prometheus-client's default registry as one collector of another registry."""

    def collect(self) -> Iterator[Any]:
        yield from REGISTRY.collect()


def count_cache_op(level: str, operation: str) -> None:
    """The cache's CountOp (dspy_fleet.store.cache) for the submit fast path."""
    CACHE_OPERATIONS.labels(level, operation).inc()


def init_app(app: Flask, broker_url: str, breaker_states: BreakerStates | None = None,
             rate_limits: RateLimits | None = None,
             sentinel_password: str | None = None) -> None:  # fmt: skip
    """Attach what /metrics reads at scrape time: the queue sampler and, when given, the
    fleet's breaker states and pacing rates."""
    app.extensions["dspy_fleet_queue_sampler"] = QueueSampler(broker_url, sentinel_password)
    app.extensions["dspy_fleet_breaker_states"] = breaker_states
    app.extensions["dspy_fleet_rate_limits"] = rate_limits


def registry() -> CollectorRegistry:
    """What /metrics serves: every gunicorn worker's samples when multiprocess mode is on,
    and the fleet's breaker states.

    Sampling happens here, at scrape time: the values are as fresh as the
    scrape and cost nothing between scrapes.
    """
    reg = CollectorRegistry()
    if has_app_context():
        sampler = current_app.extensions.get("dspy_fleet_queue_sampler")
        if sampler is not None:
            sampler.sample()
        breaker_states = current_app.extensions.get("dspy_fleet_breaker_states")
        if breaker_states is not None:
            reg.register(BreakerStateCollector(breaker_states))
        rate_limits = current_app.extensions.get("dspy_fleet_rate_limits")
        if rate_limits is not None:
            reg.register(RateLimitCollector(rate_limits))
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        multiprocess.MultiProcessCollector(reg)
    else:
        reg.register(_DefaultRegistry())
    return reg
