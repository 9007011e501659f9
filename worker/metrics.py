"""Every Prometheus metric the worker exports (SPEC §4), in one place.

Labels are fixed and low-cardinality: never job ids or tenants.

Served by worker/metrics_server.py in prometheus-client's multiprocess mode
under every pool, so gauges say how to merge the pool processes' values:
``livesum`` for work in flight (a dead child's share disappears), ``mostrecent``
for a state every process observes (the breaker).
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

PREDICTIONS = Counter(
    "dspy_predictions_total",
    "Predictions finished, by outcome.",
    ["program", "model", "variant", "status"],
)
# LLM calls take from ~50 ms (cache-warm small models) to minutes (long
# generations); the buckets span that range on a roughly doubling scale.
PREDICTION_DURATION = Histogram(
    "dspy_prediction_duration_seconds",
    "Wall time of a prediction in the worker.",
    ["program", "model"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300),
)
CACHE_OPERATIONS = Counter(
    "dspy_cache_operations_total", "Cache hits, misses, sets and errors.", ["level", "operation"]
)
BREAKER_STATE = Gauge(
    "dspy_circuit_breaker_state",
    "Circuit breaker state: 0 closed, 1 open, 2 half-open.",
    ["model"],
    multiprocess_mode="mostrecent",
)
COST = Counter("dspy_prediction_cost_total", "USD spent on predictions.", ["model", "variant"])
TOKENS = Counter("dspy_token_usage_total", "Tokens used, by type.", ["model", "type"])
ACTIVE = Gauge("dspy_active_predictions", "Predictions running now.", multiprocess_mode="livesum")
ERRORS = Counter("dspy_errors_total", "Failed predictions, by error code.", ["model", "error_type"])
