"""Every Prometheus metric the API exports (SPEC §4), in one place."""

from __future__ import annotations

import os

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, multiprocess

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
QUEUE_LENGTH = Gauge(
    "dspy_queue_length",
    "Messages waiting in a broker queue (sampled).",
    ["queue"],
    multiprocess_mode="mostrecent",
)


def registry() -> CollectorRegistry:
    """What /metrics serves: every gunicorn worker's samples when multiprocess mode is on."""
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        reg = CollectorRegistry()
        multiprocess.MultiProcessCollector(reg)
        return reg
    return REGISTRY
