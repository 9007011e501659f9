"""Every Prometheus metric the API exports (SPEC §4), in one place.

Under gunicorn the API runs several worker processes; prometheus-client's
multiprocess mode (PROMETHEUS_MULTIPROC_DIR, set by api/gunicorn_conf.py) makes
/metrics report all of them, whichever worker answers the scrape.
"""

from __future__ import annotations

import logging
import os
import threading

import redis
from flask import Flask, current_app, has_app_context
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, multiprocess

from worker.contract import QUEUES

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
JOBS_ENQUEUED = Counter("dspy_jobs_enqueued_total", "Jobs published to the broker.", ["queue"])
# Sampled by whichever gunicorn worker answers the scrape; "mostrecent" makes
# the merged value that latest sample instead of a sum over the workers.
QUEUE_LENGTH = Gauge(
    "dspy_queue_length",
    "Messages waiting in a broker queue (sampled at scrape time).",
    ["queue"],
    multiprocess_mode="mostrecent",
)

# kombu's Redis transport keeps one list per priority step: "<queue>" for the
# default priority, "<queue>\x06\x16<n>" for the others (kombu's default steps).
_PRIORITY_STEPS = (0, 3, 6, 9)
_SEP = "\x06\x16"


def queue_keys(queue: str) -> list[str]:
    """The Redis list keys that hold ``queue``'s waiting messages."""
    return [queue if step == 0 else f"{queue}{_SEP}{step}" for step in _PRIORITY_STEPS]


class QueueSampler:
    """Reads the broker's queue lengths (one pipelined round-trip of LLENs)."""

    def __init__(self, broker_url: str) -> None:
        self.client: redis.Redis | None = None
        if broker_url.startswith(("redis://", "rediss://", "unix://")):
            # Short timeouts: a slow broker must not hold up the scrape.
            self.client = redis.Redis.from_url(
                broker_url, socket_timeout=1, socket_connect_timeout=1
            )
        self._lock = threading.Lock()

    def sample(self) -> None:
        """Set dspy_queue_length for every queue; on a broker error keep the last values."""
        if self.client is None:
            return
        with self._lock:
            try:
                pipe = self.client.pipeline(transaction=False)
                for queue in QUEUES:
                    for key in queue_keys(queue):
                        pipe.llen(key)
                lengths = pipe.execute()
            except redis.RedisError as exc:
                log.warning("could not sample queue lengths: %s", exc)
                return
        per_queue = len(_PRIORITY_STEPS)
        for i, queue in enumerate(QUEUES):
            QUEUE_LENGTH.labels(queue).set(sum(lengths[i * per_queue : (i + 1) * per_queue]))


def init_app(app: Flask, broker_url: str) -> None:
    """Attach the queue sampler used at scrape time."""
    app.extensions["dspy_fleet_queue_sampler"] = QueueSampler(broker_url)


def registry() -> CollectorRegistry:
    """What /metrics serves: every gunicorn worker's samples when multiprocess mode is on.

    Sampling happens here, at scrape time: the values are as fresh as the
    scrape and cost nothing between scrapes.
    """
    if has_app_context():
        sampler = current_app.extensions.get("dspy_fleet_queue_sampler")
        if sampler is not None:
            sampler.sample()
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        reg = CollectorRegistry()
        multiprocess.MultiProcessCollector(reg)
        return reg
    return REGISTRY
