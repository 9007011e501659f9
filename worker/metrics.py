"""Every Prometheus metric the worker exports (SPEC §4), in one place.

Labels are fixed and low-cardinality: never job ids or tenants.

Served by worker/metrics_server.py in prometheus-client's multiprocess mode
under every pool, so gauges say how to merge the pool processes' values
(``livesum`` for work in flight: a dead child's share disappears).

Every metric is registered in this module's own :data:`REGISTRY`, not in
prometheus-client's default one: Flower imports the task modules (hence this module)
and serves its default registry on its /metrics, where worker families would show as a
second, always-idle instance (``dspy_active_predictions 0``). Only the worker's
metrics server serves these.

``dspy_circuit_breaker_state{model}`` is not here: it is the fleet's shared state in
Redis, exported by the API alone, read at scrape time (api/metrics.py), so N workers do
not export N copies of one value.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from dspy_fleet.store.cache import operations_counter

# What the worker's metrics server serves when multiprocess mode is off (in multiprocess
# mode it reads the pool processes' files instead; the values are written there whatever
# the registry).
REGISTRY = CollectorRegistry()

PREDICTIONS = Counter(
    "dspy_predictions_total",
    "Predictions finished, by outcome.",
    ["program", "model", "variant", "status"],
    registry=REGISTRY,
)
# LLM calls take from ~50 ms (cache-warm small models) to minutes (long
# generations); the buckets span that range on a roughly doubling scale.
PREDICTION_DURATION = Histogram(
    "dspy_prediction_duration_seconds",
    "Wall time of a prediction in the worker.",
    ["program", "model"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300),
    registry=REGISTRY,
)
CACHE_OPERATIONS = operations_counter(REGISTRY)
COST = Counter(
    "dspy_prediction_cost_total", "USD spent on predictions.", ["model", "variant"],
    registry=REGISTRY,
)  # fmt: skip
TOKENS = Counter(
    "dspy_token_usage_total", "Tokens used, by type.", ["model", "type"], registry=REGISTRY
)
ACTIVE = Gauge(
    "dspy_active_predictions", "Predictions running now.", multiprocess_mode="livesum",
    registry=REGISTRY,
)  # fmt: skip
ERRORS = Counter(
    "dspy_errors_total", "Failed predictions, by error code.", ["model", "error_type"],
    registry=REGISTRY,
)  # fmt: skip
# Pacing (dspy_fleet/store/pacing.py): jobs handed back to wait for their turn at a
# model's provider limit (reason: booked, queued, concurrency, rate_limited), and the
# provider's own 429s, each of which cuts the model's rate fleet-wide.
THROTTLED = Counter(
    "dspy_rate_limit_throttled_total",
    "Jobs handed back to wait for their turn at a model's provider limit.",
    ["model", "reason"],
    registry=REGISTRY,
)
PROVIDER_429 = Counter(
    "dspy_rate_limit_provider_429_total",
    "Provider answers of 429 (each cuts the model's pacing rate).",
    ["model"],
    registry=REGISTRY,
)

# Webhooks (worker/webhooks.py): each POST of a callback this process made, by what came of
# it: delivered (2xx), retry (refused, timed out, unreachable: tried again later), failed
# (given up: budget spent, or never sendable), lease_lost (overran its lease: not recorded).
WEBHOOK_ATTEMPTS = Counter(
    "dspy_webhook_attempts_total",
    "Webhook delivery attempts this worker made, by outcome.",
    ["outcome"],
    registry=REGISTRY,
)

# Traces (worker/traces.py), by what came of each one captured: kept (sampled), pending
# (parked for feedback to keep), truncated (its LM calls' text dropped to fit the byte
# cap; also kept or pending) or dropped (too large even so, or the redaction hook failed).
TRACES = Counter(
    "dspy_traces_total",
    "Program traces this worker captured, by outcome.",
    ["program", "outcome"],
    registry=REGISTRY,
)


def count_cache_op(level: str, operation: str) -> None:
    """The cache's CountOp (dspy_fleet.store.cache): one cache operation of this process."""
    CACHE_OPERATIONS.labels(level, operation).inc()
